"""What cluster.tls.enabled changes in the etcd members' env file, Patroni's config and units, and
the leader-away program (issue 15): with TLS off every output is the one from before TLS existed,
with TLS on only the TLS parts differ, and every file they name is one the host's layers install.
The leader-away program is also run against a local HTTPS stand-in for etcd's gateway that asks
for a client certificate, with files issued from a test CA: no etcd, no lab."""

from __future__ import annotations

import http.server
import json
import shlex
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from blocks.inventory import Inventory, parse_inventory
from lab.pki import LabCA
from tasks.adapters import etcd_config, pki
from tasks.adapters.commands import ManagedFile, Unit
from tasks.adapters.ha.base import DbSecrets
from tasks.adapters.ha.patroni import CONFIG_PATH, PatroniDriver
from tasks.adapters.haproxy import HAPROXY_CFG, HAPROXY_UNIT
from tasks.adapters.pki import ClusterCA
from tasks.desired import ClusterSecrets, db_files
from tasks.programs import etcd_leader_away as away

DB = {"pg1": "10.0.0.11", "pg2": "10.0.0.12", "pg3": "10.0.0.13"}
SECRETS = DbSecrets(superuser="postgres", superuser_password="S3cret-su", replication_user="replicator",
                    replication_password="S3cret-repl", rest_api_password="S3cret-rest")
ARCHIVE = {"archive_mode": "on", "archive_command": "pgbackrest --stanza=lab archive-push %p"}
driver = PatroniDriver()


def make_inventory(tls: bool, *, etcd_hosts: bool = False) -> Inventory:
    hosts = [{"name": n, "address": a, "roles": ["db"]} for n, a in DB.items()]
    hosts += [{"name": "router1", "address": "10.0.0.31", "roles": ["router"]},
              {"name": "router2", "address": "10.0.0.32", "roles": ["router"]},
              {"name": "restore1", "address": "10.0.0.41", "roles": ["restore"]}]
    if etcd_hosts:
        hosts += [{"name": f"etcd{i}", "address": f"10.0.0.{50 + i}", "roles": ["etcd"]} for i in (1, 2, 3)]
    return parse_inventory({
        "cluster": {"name": "lab", "network": "10.0.0.0/24", "routing": {"vip": "10.0.0.100"},
                    "admin_networks": ["10.20.0.0/16"], "tls": {"enabled": tls}},
        "hosts": hosts,
    })


OFF, ON = make_inventory(False), make_inventory(True)
MODES = pytest.mark.parametrize("inv", [OFF, ON], ids=["tls off", "tls on"])


@pytest.fixture(scope="module")
def lab_ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    ca = LabCA(tmp_path_factory.mktemp("pki"))
    ca.ensure()
    return ca


@pytest.fixture(scope="module")
def ca(lab_ca: LabCA) -> ClusterCA:
    return ClusterCA(lab_ca.certificate_pem, lab_ca.key_path.read_text())


# ------------------------------------------------------------------------------ etcd members

# What /etc/default/etcd said before issue 15 (commit 1b2d996), byte for byte.
ENV_BEFORE_TLS = """\
# Managed by bouwsteen build_cluster; local edits are overwritten.
ETCD_NAME=pg2
ETCD_DATA_DIR=/var/lib/etcd/lab
ETCD_LISTEN_PEER_URLS=http://10.0.0.12:2380
ETCD_LISTEN_CLIENT_URLS=http://10.0.0.12:2379,http://127.0.0.1:2379
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://10.0.0.12:2380
ETCD_ADVERTISE_CLIENT_URLS=http://10.0.0.12:2379
ETCD_INITIAL_CLUSTER=pg1=http://10.0.0.11:2380,pg2=http://10.0.0.12:2380,pg3=http://10.0.0.13:2380
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=bouwsteen-lab
ETCD_AUTO_COMPACTION_MODE=periodic
ETCD_AUTO_COMPACTION_RETENTION=1h
ETCD_ENABLE_V2=false
ETCD_HEARTBEAT_INTERVAL=100
ETCD_ELECTION_TIMEOUT=1000
ETCD_PRE_VOTE=true
"""
ENV_TLS = {
    "ETCD_CERT_FILE": "/etc/bouwsteen/tls/etcd/member.crt",
    "ETCD_KEY_FILE": "/etc/bouwsteen/tls/etcd/member.key",
    "ETCD_TRUSTED_CA_FILE": "/etc/bouwsteen/tls/etcd/ca.crt",
    "ETCD_CLIENT_CERT_AUTH": "true",
    "ETCD_PEER_CERT_FILE": "/etc/bouwsteen/tls/etcd/member.crt",
    "ETCD_PEER_KEY_FILE": "/etc/bouwsteen/tls/etcd/member.key",
    "ETCD_PEER_TRUSTED_CA_FILE": "/etc/bouwsteen/tls/etcd/ca.crt",
    "ETCD_PEER_CLIENT_CERT_AUTH": "true",
}


def env(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines()[1:]]
    assert len(pairs) == len({k for k, _ in pairs}), "a key is set twice"
    return dict(pairs)  # type: ignore[arg-type]


def test_etcd_env_without_tls_is_the_one_from_before() -> None:
    assert etcd_config.render_env(OFF, OFF.host("pg2")) == ENV_BEFORE_TLS


def test_etcd_env_with_tls() -> None:
    on = env(etcd_config.render_env(ON, ON.host("pg2")))
    off = env(ENV_BEFORE_TLS)
    # Every URL https (clients, peers, the initial cluster), nothing else changed; then the TLS keys.
    assert list(on) == [*off, *ENV_TLS]
    assert {k: on[k] for k in off} == {k: v.replace("http://", "https://") for k, v in off.items()}
    assert {k: on[k] for k in ENV_TLS} == ENV_TLS
    assert "http://" not in etcd_config.render_env(ON, ON.host("pg2"))


@pytest.mark.parametrize(("etcd_hosts", "host"), [(False, "pg1"), (True, "etcd2")])
def test_etcd_member_files(ca: ClusterCA, etcd_hosts: bool, host: str) -> None:
    on, off = make_inventory(True, etcd_hosts=etcd_hosts), make_inventory(False, etcd_hosts=etcd_hosts)
    assert [f.path for f in etcd_config.member_files(off, off.host(host), ca)] == [etcd_config.ENV_PATH]
    files = etcd_config.member_files(on, on.host(host), ca)
    # The pair before the env file that names it: etcd must find it when it (re)starts.
    assert [f.path for f in files] == [pki.ETCD_CA, pki.ETCD_MEMBER_KEY, pki.ETCD_MEMBER_CERT, etcd_config.ENV_PATH]
    by_path = {f.path: f for f in files}
    named = {v for k, v in env(by_path[etcd_config.ENV_PATH].content).items() if k.endswith("_FILE")}
    assert named == {pki.ETCD_CA, pki.ETCD_MEMBER_KEY, pki.ETCD_MEMBER_CERT}
    # etcd runs as etcd: its key is etcd's alone.
    assert (by_path[pki.ETCD_MEMBER_KEY].owner, by_path[pki.ETCD_MEMBER_KEY].mode) == ("etcd", 0o600)
    assert by_path[pki.ETCD_MEMBER_KEY].secret


def test_etcd_member_files_need_the_ca() -> None:
    with pytest.raises(LookupError, match="the cluster's CA is not registered"):
        etcd_config.member_files(ON, ON.host("pg1"))
    assert [f.path for f in etcd_config.member_files(OFF, OFF.host("pg1"))] == [etcd_config.ENV_PATH]


@pytest.mark.parametrize(
    ("inv", "restart_on"),
    [
        (None, ("/etc/default/etcd",)),
        (OFF, ("/etc/default/etcd",)),
        (ON, ("/etc/default/etcd", "/etc/bouwsteen/tls/etcd/ca.crt", "/etc/bouwsteen/tls/etcd/member.crt",
              "/etc/bouwsteen/tls/etcd/member.key")),
    ],
    ids=["no inventory", "tls off", "tls on"],
)
def test_etcd_member_units(inv: Inventory | None, restart_on: tuple[str, ...]) -> None:
    assert etcd_config.member_units(inv) == [Unit("etcd.service", restart_on=restart_on, package="etcd-server")]


# ------------------------------------------------------------------------------ leader away, the command

AWAY_BEFORE_TLS = ("python3", "/usr/local/lib/bouwsteen/etcd_leader_away.py", "--member", "pg2", "--endpoints",
                   "http://10.0.0.11:2379,http://10.0.0.12:2379,http://10.0.0.13:2379")
AWAY_TLS = ("python3", "/usr/local/lib/bouwsteen/etcd_leader_away.py", "--member", "pg2", "--endpoints",
            "https://10.0.0.11:2379,https://10.0.0.12:2379,https://10.0.0.13:2379",
            "--cacert", "/var/lib/postgresql/tls/ca.crt", "--cert", "/var/lib/postgresql/tls/etcd-client.crt",
            "--key", "/var/lib/postgresql/tls/etcd-client.key")


@pytest.mark.parametrize(("inv", "argv"), [(OFF, AWAY_BEFORE_TLS), (ON, AWAY_TLS)], ids=["tls off", "tls on"])
def test_leader_away_command(inv: Inventory, argv: tuple[str, ...]) -> None:
    command = etcd_config.leader_away_command(inv, inv.host("pg2"))
    assert command.argv == argv
    assert command.ok_codes == (0, 1)
    # Patroni's callbacks run the very same line (it appends action, role and scope).
    callbacks = yaml.safe_load(driver.render_config(inv, inv.host("pg2"), SECRETS, ARCHIVE))["postgresql"]["callbacks"]
    assert callbacks == {"on_start": shlex.join(argv), "on_role_change": shlex.join(argv)}


# ------------------------------------------------------------------------------ leader away, over TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory, ca: ClusterCA) -> dict[str, str]:
    """The files a database host holds, issued from the test CA, written to a folder."""
    folder = tmp_path_factory.mktemp("host-tls")
    member = etcd_config.member_files(ON, ON.host("pg1"), ca)
    client = [f for f in pki.postgres_tls_files(ON, ON.host("pg1"), ca, (pki.ETCD_CLIENT,))
              if Path(f.path).stem == pki.ETCD_CLIENT]
    paths: dict[str, str] = {}
    for f in [*member, *client]:
        target = folder / Path(f.path).name
        target.write_text(f.content)
        paths[f.path] = str(target)
    crt, key = pki.pg_client_pair(pki.ETCD_CLIENT)
    return {"ca": paths[pki.ETCD_CA], "member_cert": paths[pki.ETCD_MEMBER_CERT],
            "member_key": paths[pki.ETCD_MEMBER_KEY], "cert": paths[crt], "key": paths[key]}


class Gateway(http.server.ThreadingHTTPServer):
    """etcd's JSON gateway as far as the program asks it: pg2 (id 2) leads, pg1 (id 1) is listed too."""

    url = ""
    peers: list[str]


class GatewayHandler(http.server.BaseHTTPRequestHandler):
    server: Gateway

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        peer = self.connection.getpeercert()  # type: ignore[attr-defined]
        self.server.peers.append(dict(x[0] for x in peer["subject"])["commonName"])
        if self.path == "/v3/cluster/member/list":
            body = {"members": [{"ID": "1", "name": "pg1", "clientURLs": [self.server.url]},
                                {"ID": "2", "name": "pg2", "clientURLs": [self.server.url]}]}
        elif self.path == "/v3/maintenance/status":
            body = {"header": {"member_id": "2"}, "leader": "2", "raftIndex": "7"}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def gateway(tls_files: dict[str, str]) -> Iterator[Gateway]:
    """On 127.0.0.1 with pg1's etcd member pair, asking every client for a certificate of the CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files["member_cert"], tls_files["member_key"])
    context.load_verify_locations(tls_files["ca"])
    context.verify_mode = ssl.CERT_REQUIRED
    server = Gateway(("127.0.0.1", 0), GatewayHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.url = f"https://127.0.0.1:{server.server_address[1]}"
    server.peers = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _restore_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(away, "TLS_CONTEXT", None)  # main() sets the module's global
    monkeypatch.setattr(away, "REQUEST_TIMEOUT_S", 5.0)


def test_leader_away_over_tls_with_the_client_pair(gateway: Gateway, tls_files: dict[str, str], capsys) -> None:
    code = away.main(["--member", "pg1", "--endpoints", gateway.url, "--cacert", tls_files["ca"],
                      "--cert", tls_files["cert"], "--key", tls_files["key"]])
    assert (code, capsys.readouterr().out.strip()) == (0, "the etcd leader is pg2, not the primary's host pg1.")
    assert away.TLS_CONTEXT is not None and away.TLS_CONTEXT.verify_mode == ssl.CERT_REQUIRED
    assert away.TLS_CONTEXT.check_hostname  # the member's certificate must name the address asked
    assert set(gateway.peers) == {pki.ETCD_CLIENT}  # the gateway saw the etcd client's certificate


def test_leader_away_without_a_client_pair_is_refused(gateway: Gateway, tls_files: dict[str, str], capsys) -> None:
    code = away.main(["--member", "pg1", "--endpoints", gateway.url, "--cacert", tls_files["ca"]])
    assert code == 1
    assert "no etcd endpoint answered" in capsys.readouterr().err
    assert gateway.peers == []


def test_leader_away_refuses_a_member_of_another_ca(gateway: Gateway, tls_files: dict[str, str], tmp_path: Path,
                                                    capsys) -> None:
    other = LabCA(tmp_path / "other")
    other.ensure()
    code = away.main(["--member", "pg1", "--endpoints", gateway.url, "--cacert", str(other.cert_path),
                      "--cert", tls_files["cert"], "--key", tls_files["key"]])
    assert code == 1
    assert "no etcd endpoint answered" in capsys.readouterr().err
    assert gateway.peers == []


@pytest.mark.parametrize("missing", ["cacert", "cert", "key"])
def test_leader_away_with_unreadable_tls_files_says_so(tls_files: dict[str, str], tmp_path: Path, missing: str,
                                                        capsys) -> None:
    paths = {"cacert": tls_files["ca"], "cert": tls_files["cert"], "key": tls_files["key"],
             missing: str(tmp_path / "absent.pem")}
    code = away.main(["--member", "pg1", "--endpoints", "https://127.0.0.1:1", "--cacert", paths["cacert"],
                      "--cert", paths["cert"], "--key", paths["key"]])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("etcd leader placement failed: ") and len(err.strip().splitlines()) == 1


def test_leader_away_as_a_replicas_callback_reads_no_tls_file(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent.pem")
    assert away.main(["--member", "pg1", "--endpoints", "https://127.0.0.1:1", "--cacert", absent, "--cert", absent,
                      "--key", absent, "on_role_change", "replica", "lab"]) == 0
    assert away.TLS_CONTEXT is None


def test_leader_away_without_tls_options_has_no_context(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def urlopen(request: Any, timeout: float, context: Any) -> Any:
        seen.append(context)
        raise OSError("no network in unit tests")

    monkeypatch.setattr(away.urllib.request, "urlopen", urlopen)
    assert away.main(["--member", "pg1", "--endpoints", "http://10.0.0.11:2379"]) == 1
    assert seen == [None] and away.TLS_CONTEXT is None


# ------------------------------------------------------------------------------ Patroni

HBA_BEFORE_TLS = [
    "local all postgres peer",
    "local replication postgres peer",
    "host replication replicator 127.0.0.1/32 scram-sha-256",
    "host replication replicator 10.0.0.11/32 scram-sha-256",
    "host all postgres 10.0.0.11/32 scram-sha-256",
    "host app all 10.0.0.11/32 scram-sha-256",
    "host replication replicator 10.0.0.12/32 scram-sha-256",
    "host all postgres 10.0.0.12/32 scram-sha-256",
    "host app all 10.0.0.12/32 scram-sha-256",
    "host replication replicator 10.0.0.13/32 scram-sha-256",
    "host all postgres 10.0.0.13/32 scram-sha-256",
    "host app all 10.0.0.13/32 scram-sha-256",
    "host all postgres 10.0.0.41/32 scram-sha-256",
    "host all postgres 10.20.0.0/16 scram-sha-256",
    "host app all 10.20.0.0/16 scram-sha-256",
    "host postgres all 10.20.0.0/16 scram-sha-256",
    "host app app 10.0.0.31/32 scram-sha-256",
    "host postgres pgroute66 10.0.0.31/32 scram-sha-256",
    "host app app 10.0.0.32/32 scram-sha-256",
    "host postgres pgroute66 10.0.0.32/32 scram-sha-256",
]
ETCD_HOSTS = ["10.0.0.11:2379", "10.0.0.12:2379", "10.0.0.13:2379"]
TLS_DIR = "/var/lib/postgresql/tls"


def config(inv: Inventory, host: str = "pg2") -> dict:
    return yaml.safe_load(driver.render_config(inv, inv.host(host), SECRETS, ARCHIVE))


@pytest.mark.parametrize(
    ("inv", "expected"),
    [
        (OFF, {"hosts": ETCD_HOSTS, "protocol": "http"}),
        (ON, {"hosts": ETCD_HOSTS, "protocol": "https", "cacert": f"{TLS_DIR}/ca.crt",
              "cert": f"{TLS_DIR}/etcd-client.crt", "key": f"{TLS_DIR}/etcd-client.key"}),
    ],
    ids=["tls off", "tls on"],
)
def test_patroni_etcd3(inv: Inventory, expected: dict) -> None:
    assert config(inv)["etcd3"] == expected


@pytest.mark.parametrize(
    ("inv", "expected"),
    [
        (OFF, {"superuser": {"username": "postgres", "password": "S3cret-su"},
               "replication": {"username": "replicator", "password": "S3cret-repl"}}),
        (ON, {"superuser": {"username": "postgres", "password": "S3cret-su", "sslmode": "verify-full",
                            "sslrootcert": f"{TLS_DIR}/ca.crt", "sslcert": f"{TLS_DIR}/postgres.crt",
                            "sslkey": f"{TLS_DIR}/postgres.key"},
              "replication": {"username": "replicator", "password": "S3cret-repl", "sslmode": "verify-full",
                              "sslrootcert": f"{TLS_DIR}/ca.crt", "sslcert": f"{TLS_DIR}/replicator.crt",
                              "sslkey": f"{TLS_DIR}/replicator.key"}}),
    ],
    ids=["tls off", "tls on"],
)
def test_patroni_authentication(inv: Inventory, expected: dict) -> None:
    assert config(inv)["postgresql"]["authentication"] == expected


@pytest.mark.parametrize(
    ("inv", "expected"),
    [
        (OFF, {"unix_socket_directories": "/var/run/postgresql"}),
        (ON, {"unix_socket_directories": "/var/run/postgresql", "ssl": "on", "ssl_cert_file": f"{TLS_DIR}/server.crt",
              "ssl_key_file": f"{TLS_DIR}/server.key", "ssl_ca_file": f"{TLS_DIR}/ca.crt",
              "ssl_min_protocol_version": "TLSv1.2"}),
    ],
    ids=["tls off", "tls on"],
)
def test_patroni_local_parameters(inv: Inventory, expected: dict) -> None:
    assert config(inv)["postgresql"]["parameters"] == expected
    # Local, never DCS-wide: a member without its certificate is never told to use one.
    dcs = config(inv)["bootstrap"]["dcs"]["postgresql"]["parameters"]
    assert not any(name.startswith("ssl") for name in dcs)
    assert not any(name.startswith("ssl") for name in driver.dynamic_configuration(inv, ARCHIVE)["postgresql"]["parameters"])


def test_patroni_pg_hba_without_tls_is_the_one_from_before() -> None:
    assert driver.pg_hba(OFF, SECRETS) == HBA_BEFORE_TLS
    assert config(OFF)["postgresql"]["pg_hba"] == HBA_BEFORE_TLS


def _tls_line(line: str) -> str:
    """The TLS counterpart of a line from before: TCP only over TLS, and the superuser and the
    replication role with their client certificate instead of a password."""
    if line.startswith("local "):
        return line
    _kind, database, user, address, method = line.split()
    if database == "replication" or user == SECRETS.superuser:
        method = "cert"
    return f"hostssl {database} {user} {address} {method}"


def test_patroni_pg_hba_with_tls() -> None:
    assert driver.pg_hba(ON, SECRETS) == [_tls_line(line) for line in HBA_BEFORE_TLS]
    lines = [line.split() for line in driver.pg_hba(ON, SECRETS)]
    assert {words[0] for words in lines} == {"local", "hostssl"}
    for words in lines:
        kind, database, user, method = words[0], words[1], words[2], words[-1]
        if kind == "local":
            assert method == "peer"
        elif database == "replication" or user == "postgres":
            assert method == "cert", (database, user)
        else:
            assert method == "scram-sha-256"  # application, monitor and admin-network logins keep passwords


TLS_SECTIONS = {("etcd3",), ("postgresql", "authentication"), ("postgresql", "parameters"),
                ("postgresql", "pg_hba"), ("postgresql", "callbacks"), ("restapi",), ("ctl",)}


def _without(document: dict, sections: set[tuple[str, ...]]) -> dict:
    out = json.loads(json.dumps(document))
    for path in sections:
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        parent.pop(path[-1])
    return out


@pytest.mark.parametrize("host", sorted(DB))
def test_patroni_tls_changes_only_its_sections(host: str) -> None:
    off, on = config(OFF, host), config(ON, host)
    assert _without(on, TLS_SECTIONS) == _without(off, TLS_SECTIONS)
    for path in TLS_SECTIONS:
        a, b = on, off
        for key in path:
            a, b = a[key], b[key]
        assert a != b, path


@pytest.mark.parametrize(
    ("inv", "patroni_reload", "haproxy_reload"),
    [
        (OFF, (CONFIG_PATH,), (HAPROXY_CFG,)),
        (ON, (CONFIG_PATH, f"{TLS_DIR}/ca.crt", f"{TLS_DIR}/server.crt", f"{TLS_DIR}/server.key"),
         (HAPROXY_CFG, "/etc/haproxy/bouwsteen-check.pem", f"{TLS_DIR}/ca.crt")),
    ],
    ids=["tls off", "tls on"],
)
def test_patroni_host_units(inv: Inventory, patroni_reload: tuple[str, ...], haproxy_reload: tuple[str, ...]) -> None:
    # A reload, never a restart: Patroni reloads PostgreSQL (and its REST API's pair) on SIGHUP;
    # HAProxy reloads when its health checks' client pair or the CA changed.
    assert driver.host_units(inv, inv.host("pg1")) == [
        Unit("patroni.service", reload_on=patroni_reload, package="patroni"),
        Unit(HAPROXY_UNIT, reload_on=haproxy_reload, package="haproxy")]


def _named_paths(document: Any) -> set[str]:
    """Every absolute path under the TLS folder that a rendered document names."""
    if isinstance(document, dict):
        return set().union(*(_named_paths(v) for v in document.values())) if document else set()
    if isinstance(document, list):
        return set().union(*(_named_paths(v) for v in document)) if document else set()
    if isinstance(document, str):
        return {word for word in shlex.split(document) if word.startswith(TLS_DIR)} if TLS_DIR in document else set()
    return set()


def test_patroni_names_only_files_the_database_layer_installs(ca: ClusterCA) -> None:
    files: dict[str, ManagedFile] = {f.path: f for f in db_files(ON, ON.host("pg2"), ClusterSecrets(SECRETS, None,
                                                                                                   ca=ca))}
    named = _named_paths(config(ON)) | set(pki.tls_paths())
    assert named == {f"{TLS_DIR}/{name}" for name in ("ca.crt", "server.crt", "server.key", "postgres.crt",
                                                     "postgres.key", "replicator.crt", "replicator.key",
                                                     "etcd-client.crt", "etcd-client.key")}
    assert named <= set(files)
    # Patroni, PostgreSQL and the leader-away callback all run as postgres: the keys are postgres's alone.
    for path in named:
        if path.endswith(".key"):
            assert (files[path].owner, files[path].mode, files[path].secret) == ("postgres", 0o600, True)
    # ...and installed before the config that names them.
    order = list(files)
    assert max(order.index(p) for p in named) < order.index(CONFIG_PATH)
