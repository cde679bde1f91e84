"""etcd member configuration for Debian's etcd-server unit (/etc/default/etcd). Pure rendering."""

from __future__ import annotations

from pathlib import Path

from blocks.inventory import HostSpec, Inventory
from tasks.adapters import pki
from tasks.adapters.commands import Command, ManagedFile, Unit, cmd

ENV_PATH = "/etc/default/etcd"
LEADER_AWAY_BIN = "/usr/local/lib/bouwsteen/etcd_leader_away.py"
LEADER_AWAY_SOURCE = Path(__file__).parents[1] / "programs" / "etcd_leader_away.py"


def data_dir(inv: Inventory) -> str:
    return f"/var/lib/etcd/{inv.cluster.name}"


def client_endpoints(inv: Inventory) -> list[str]:
    return [f"{m.address}:{inv.cluster.etcd.client_port}" for m in inv.etcd_members]


def scheme(inv: Inventory) -> str:
    return "https" if inv.cluster.tls.enabled else "http"


def client_urls(inv: Inventory) -> list[str]:
    return [f"{scheme(inv)}://{endpoint}" for endpoint in client_endpoints(inv)]


def leader_away_file() -> ManagedFile:
    """On every database host: the HA manager's callback and the flows run it on the primary."""
    return ManagedFile(LEADER_AWAY_BIN, LEADER_AWAY_SOURCE.read_text(), owner="root", mode=0o755)


def leader_away_command(inv: Inventory, host: HostSpec) -> Command:
    """Exit 1 (a move was needed and failed) is an answer the caller reports, not a crash."""
    tls: list[str] = []
    if inv.cluster.tls.enabled:
        crt, key = pki.pg_client_pair(pki.ETCD_CLIENT)
        tls = ["--cacert", pki.PG_CA, "--cert", crt, "--key", key]
    return cmd("python3", LEADER_AWAY_BIN, "--member", host.name, "--endpoints", ",".join(client_urls(inv)), *tls,
               timeout=30, ok_codes=(0, 1), description="keep the etcd leader off the primary's host")


def render_env(inv: Inventory, host: HostSpec, *, initial_state: str = "new") -> str:
    """`initial_state`: "existing" only for the first start of a member that `member add` announced
    (replace_member); the file then goes back to the desired "new", which etcd no longer reads."""
    if initial_state not in ("new", "existing"):
        raise ValueError(f"initial_state: {initial_state!r} is neither 'new' nor 'existing'")
    etcd = inv.cluster.etcd
    web = scheme(inv)
    members = ",".join(f"{m.name}={peer_url(inv, m)}" for m in inv.etcd_members)
    settings = {
        "ETCD_NAME": host.name,
        "ETCD_DATA_DIR": data_dir(inv),
        "ETCD_LISTEN_PEER_URLS": f"{web}://{host.address}:{etcd.peer_port}",
        "ETCD_LISTEN_CLIENT_URLS": f"{web}://{host.address}:{etcd.client_port},{web}://127.0.0.1:{etcd.client_port}",
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": peer_url(inv, host),
        "ETCD_ADVERTISE_CLIENT_URLS": f"{web}://{host.address}:{etcd.client_port}",
        "ETCD_INITIAL_CLUSTER": members,
        # Only read when the data dir is empty: a rerun never re-bootstraps an existing member.
        "ETCD_INITIAL_CLUSTER_STATE": initial_state,
        "ETCD_INITIAL_CLUSTER_TOKEN": f"bouwsteen-{inv.cluster.name}",
        # Patroni/stolon rewrite their keys every few seconds; without compaction the DB grows forever.
        "ETCD_AUTO_COMPACTION_MODE": "periodic",
        "ETCD_AUTO_COMPACTION_RETENTION": "1h",
        "ETCD_ENABLE_V2": "false",
        "ETCD_HEARTBEAT_INTERVAL": "100",
        "ETCD_ELECTION_TIMEOUT": "1000",
        # A member back from a partition would otherwise force an election with its higher term;
        # the write stall can cost the HA manager its leader key (etcd 3.5 turns this on by default).
        "ETCD_PRE_VOTE": "true",
    }
    if inv.cluster.tls.enabled:
        # Clients and peers alike must show a certificate of the cluster's CA: nobody else can
        # read or write the HA manager's keys (a new archive_command in Patroni's config, say).
        settings.update({
            "ETCD_CERT_FILE": pki.ETCD_MEMBER_CERT, "ETCD_KEY_FILE": pki.ETCD_MEMBER_KEY,
            "ETCD_TRUSTED_CA_FILE": pki.ETCD_CA, "ETCD_CLIENT_CERT_AUTH": "true",
            "ETCD_PEER_CERT_FILE": pki.ETCD_MEMBER_CERT, "ETCD_PEER_KEY_FILE": pki.ETCD_MEMBER_KEY,
            "ETCD_PEER_TRUSTED_CA_FILE": pki.ETCD_CA, "ETCD_PEER_CLIENT_CERT_AUTH": "true",
        })
    lines = ["# Managed by bouwsteen build_cluster; local edits are overwritten."]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def peer_url(inv: Inventory, host: HostSpec) -> str:
    return f"{scheme(inv)}://{host.address}:{inv.cluster.etcd.peer_port}"


def member_files(inv: Inventory, host: HostSpec, ca: pki.ClusterCA | None = None) -> list[ManagedFile]:
    files = []
    if inv.cluster.tls.enabled:
        if ca is None:
            raise LookupError("cluster.tls.enabled, but the cluster's CA is not registered")
        # Before the env file that names them: etcd must find its pair when it starts.
        files += pki.etcd_member_files(inv, host, ca)
    return [*files, ManagedFile(ENV_PATH, render_env(inv, host), owner="root", mode=0o644)]


def member_units(inv: Inventory | None = None) -> list[Unit]:
    # A changed pair or CA is only read at start: the runbooks restart members one at a time.
    tls = pki.etcd_member_paths() if inv is not None and inv.cluster.tls.enabled else ()
    return [Unit("etcd.service", restart_on=(ENV_PATH, *tls), package="etcd-server")]


def foreign_clusters(keys, own_prefix: str) -> list[str]:
    """The other clusters whose keys sit beside this one's under the HA manager's parent prefix
    (`/service/lab/…` is ours, `/service/lab2/…` is not: the prefix ends at a slash)."""
    own = own_prefix.rstrip("/")
    parent = own.rsplit("/", 1)[0] + "/"
    return sorted({k[len(parent):].split("/", 1)[0] for k in keys
                   if k.startswith(parent) and k != own and not k.startswith(own + "/")})
