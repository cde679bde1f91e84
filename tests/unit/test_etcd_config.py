"""tasks/adapters/etcd_config.py: /etc/default/etcd per member, client endpoints."""

from __future__ import annotations

from typing import Any

import pytest

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.etcd_config import (
    ENV_PATH,
    client_endpoints,
    data_dir,
    member_files,
    member_units,
    render_env,
)

DB = [("pg1", "10.0.0.11"), ("pg2", "10.0.0.12"), ("pg3", "10.0.0.13")]


def make_inventory(explicit_etcd: bool = False, **cluster: Any) -> Inventory:
    hosts = [{"name": n, "address": a, "roles": ["db"]} for n, a in DB]
    if explicit_etcd:
        hosts += [{"name": f"etcd{i}", "address": f"10.0.0.{50 + i}", "roles": ["etcd"]} for i in (1, 2, 3)]
    base: dict[str, Any] = {"name": "lab", "network": "10.0.0.0/24"}
    base.update(cluster)
    return parse_inventory({"cluster": base, "hosts": hosts})


INV = make_inventory()


def env(inv: Inventory, host: str) -> dict[str, str]:
    text = render_env(inv, inv.host(host))
    lines = text.splitlines()
    assert lines[0].startswith("#")
    pairs = [line.split("=", 1) for line in lines[1:]]
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), "a key is set twice"
    return dict(pairs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("host", "address"), DB)
def test_render_env_default_ports(host: str, address: str) -> None:
    e = env(INV, host)
    assert e["ETCD_NAME"] == host
    assert e["ETCD_DATA_DIR"] == "/var/lib/etcd/lab"
    assert e["ETCD_LISTEN_PEER_URLS"] == f"http://{address}:2380"
    assert e["ETCD_LISTEN_CLIENT_URLS"] == f"http://{address}:2379,http://127.0.0.1:2379"
    assert e["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == f"http://{address}:2380"
    assert e["ETCD_ADVERTISE_CLIENT_URLS"] == f"http://{address}:2379"
    assert e["ETCD_INITIAL_CLUSTER"] == "pg1=http://10.0.0.11:2380,pg2=http://10.0.0.12:2380,pg3=http://10.0.0.13:2380"
    assert e["ETCD_INITIAL_CLUSTER_STATE"] == "new"
    assert e["ETCD_INITIAL_CLUSTER_TOKEN"] == "bouwsteen-lab"
    assert e["ETCD_AUTO_COMPACTION_MODE"] == "periodic"
    assert e["ETCD_AUTO_COMPACTION_RETENTION"] == "1h"
    assert e["ETCD_ENABLE_V2"] == "false"


def test_render_env_exact_keys_and_trailing_newline() -> None:
    text = render_env(INV, INV.host("pg2"))
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert list(env(INV, "pg2")) == [
        "ETCD_NAME",
        "ETCD_DATA_DIR",
        "ETCD_LISTEN_PEER_URLS",
        "ETCD_LISTEN_CLIENT_URLS",
        "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        "ETCD_ADVERTISE_CLIENT_URLS",
        "ETCD_INITIAL_CLUSTER",
        "ETCD_INITIAL_CLUSTER_STATE",
        "ETCD_INITIAL_CLUSTER_TOKEN",
        "ETCD_AUTO_COMPACTION_MODE",
        "ETCD_AUTO_COMPACTION_RETENTION",
        "ETCD_ENABLE_V2",
        "ETCD_HEARTBEAT_INTERVAL",
        "ETCD_ELECTION_TIMEOUT",
        "ETCD_PRE_VOTE",
    ]


@pytest.mark.parametrize(
    ("cluster", "client", "peer", "name"),
    [
        ({"etcd": {"client_port": 12379, "peer_port": 12380}}, 12379, 12380, "lab"),
        ({"name": "prod-east"}, 2379, 2380, "prod-east"),
    ],
)
def test_render_env_follows_inventory(cluster: dict, client: int, peer: int, name: str) -> None:
    inv = make_inventory(**cluster)
    e = env(inv, "pg3")
    assert e["ETCD_DATA_DIR"] == f"/var/lib/etcd/{name}"
    assert e["ETCD_INITIAL_CLUSTER_TOKEN"] == f"bouwsteen-{name}"
    assert e["ETCD_LISTEN_PEER_URLS"] == f"http://10.0.0.13:{peer}"
    assert e["ETCD_LISTEN_CLIENT_URLS"] == f"http://10.0.0.13:{client},http://127.0.0.1:{client}"
    assert e["ETCD_ADVERTISE_CLIENT_URLS"] == f"http://10.0.0.13:{client}"
    assert e["ETCD_INITIAL_CLUSTER"] == ",".join(f"{n}=http://{a}:{peer}" for n, a in DB)
    assert data_dir(inv) == f"/var/lib/etcd/{name}"


def test_data_dir_differs_per_cluster() -> None:
    assert data_dir(make_inventory(name="alpha")) != data_dir(make_inventory(name="beta"))


def test_explicit_etcd_members_form_the_initial_cluster() -> None:
    inv = make_inventory(explicit_etcd=True)
    e = env(inv, "etcd2")
    assert e["ETCD_NAME"] == "etcd2"
    assert e["ETCD_INITIAL_CLUSTER"] == (
        "etcd1=http://10.0.0.51:2380,etcd2=http://10.0.0.52:2380,etcd3=http://10.0.0.53:2380"
    )
    assert client_endpoints(inv) == ["10.0.0.51:2379", "10.0.0.52:2379", "10.0.0.53:2379"]


@pytest.mark.parametrize(
    ("inv", "expected"),
    [
        (INV, ["10.0.0.11:2379", "10.0.0.12:2379", "10.0.0.13:2379"]),
        (make_inventory(etcd={"client_port": 4001, "peer_port": 4002}),
         ["10.0.0.11:4001", "10.0.0.12:4001", "10.0.0.13:4001"]),
    ],
)
def test_client_endpoints(inv: Inventory, expected: list[str]) -> None:
    assert client_endpoints(inv) == expected


def test_member_files_and_units() -> None:
    (f,) = member_files(INV, INV.host("pg1"))
    assert (f.path, f.owner, f.mode, f.secret) == (ENV_PATH, "root", 0o644, False)
    assert f.content == render_env(INV, INV.host("pg1"))
    (unit,) = member_units()
    assert (unit.name, unit.restart_on) == ("etcd.service", (ENV_PATH,))


@pytest.mark.parametrize("keys, foreign", [
    (["/bouwsteen/patroni/lab/leader", "/bouwsteen/patroni/lab/members/pg1"], []),
    (["/bouwsteen/patroni/lab2/leader"], ["lab2"]),  # a name that merely starts like ours
    (["/bouwsteen/patroni/lab/leader", "/bouwsteen/patroni/prod/config", "/bouwsteen/patroni/prod/leader"], ["prod"]),
    (["/bouwsteen/patroni/lab"], []),
    ([], []),
])
def test_foreign_clusters(keys, foreign):
    from tasks.adapters.etcd_config import foreign_clusters

    assert foreign_clusters(keys, "/bouwsteen/patroni/lab/") == foreign


def test_a_member_announced_by_member_add_starts_with_the_existing_state() -> None:
    """replace_member's first start of the new member; everything else is the desired file."""
    desired = render_env(INV, INV.host("pg3"))
    joining = render_env(INV, INV.host("pg3"), initial_state="existing")
    assert "ETCD_INITIAL_CLUSTER_STATE=new\n" in desired
    assert joining == desired.replace("ETCD_INITIAL_CLUSTER_STATE=new\n", "ETCD_INITIAL_CLUSTER_STATE=existing\n")
    with pytest.raises(ValueError, match="initial_state"):
        render_env(INV, INV.host("pg3"), initial_state="existing\nETCD_NAME=x")
