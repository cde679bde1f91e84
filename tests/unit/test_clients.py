"""The client connection report: rendered from the inventory alone, never with a password."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blocks.inventory import Inventory, parse_inventory
from tasks.clients import ClientConnections


def make_inventory(**cluster: Any) -> Inventory:
    base: dict[str, Any] = {"name": "lab", "network": "172.29.66.0/24"}
    base.update(cluster)
    return parse_inventory({
        "cluster": base,
        "hosts": [
            {"name": "pg1", "address": "172.29.66.11", "roles": ["db", "etcd"]},
            {"name": "pg2", "address": "172.29.66.12", "roles": ["db", "etcd"]},
            {"name": "pg3", "address": "172.29.66.13", "roles": ["db", "etcd"]},
            {"name": "router1", "address": "172.29.66.31", "roles": ["router"]},
        ],
    })


ROUTED = make_inventory(routing={"vip": "172.29.66.100"})
HOSTS = "172.29.66.11:5432,172.29.66.12:5432,172.29.66.13:5432"


def test_uris_fail_over_on_the_client_side() -> None:
    facts = ClientConnections.of(ROUTED, "app")
    assert facts.rw_uri == f"postgresql://app@{HOSTS}/app?target_session_attrs=read-write&connect_timeout=3"
    assert facts.ro_uri == f"postgresql://app@{HOSTS}/app?target_session_attrs=prefer-standby&connect_timeout=3"
    assert facts.jdbc_url == f"jdbc:postgresql://{HOSTS}/app?targetServerType=primary&connectTimeout=3"
    assert facts.jdbc_ro_url == (f"jdbc:postgresql://{HOSTS}/app?targetServerType=preferSecondary"
                                 "&loadBalanceHosts=true&connectTimeout=3")


def test_pg_service_conf_sections() -> None:
    text = ClientConnections.of(ROUTED, "app").pg_service_conf()
    sections = {block.splitlines()[0]: block.splitlines()[1:] for block in text.split("\n\n")[1:]}
    assert list(sections) == ["[lab]", "[lab-ro]", "[lab-vip]", "[lab-vip-ro]"]
    assert sections["[lab]"] == ["host=172.29.66.11,172.29.66.12,172.29.66.13", "port=5432", "dbname=app",
                                 "user=app", "connect_timeout=3", "target_session_attrs=read-write"]
    assert sections["[lab-ro]"][-1] == "target_session_attrs=prefer-standby"
    assert sections["[lab-vip]"] == ["host=172.29.66.100", "port=5432", "dbname=app", "user=app", "connect_timeout=3"]
    assert sections["[lab-vip-ro]"][:2] == ["host=172.29.66.100", "port=5433"]


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        # Without a routing cluster: only the database hosts, no VIP rows or sections.
        ({}, ["read-write on any database host"] * 3),
        ({"routing": {"vip": "172.29.66.100"}},
         ["read-write through the VIP", "read-only through the VIP"] + ["read-write on any database host"] * 3),
    ],
)
def test_endpoints_follow_the_inventory(cluster: dict, expected: list[str]) -> None:
    facts = ClientConnections.of(make_inventory(**cluster), "app")
    rows = facts.rows()
    assert [r["how"] for r in rows][:-4] == expected
    assert [r["connect to"] for r in rows if r["how"] == "read-write on any database host"] == [
        "172.29.66.11:25432", "172.29.66.12:25432", "172.29.66.13:25432"]
    assert ("[lab-vip]" in facts.pg_service_conf()) is ("routing" in cluster)


def test_ports_and_names_come_from_the_inventory() -> None:
    inv = make_inventory(name="prod-east", postgres={"port": 6432, "application_database": "orders"},
                         patroni={"proxy_port": 26432})
    facts = ClientConnections.of(inv, "orders_app")
    assert facts.rw_uri.startswith("postgresql://orders_app@172.29.66.11:6432,")
    assert "/orders?" in facts.rw_uri
    assert {e.port for e in facts.primary_port_endpoints} == {26432}
    assert facts.pg_service_conf().split("\n\n")[1].splitlines()[0] == "[prod-east]"


def test_no_password_anywhere() -> None:
    facts = ClientConnections.of(ROUTED, "app")
    text = facts.markdown(Path("/var/lib/bouwsteen/clients/lab/pg_service.conf")) + facts.pg_service_conf()
    assert "password" not in text.replace("the password is not in this report", "").replace("No passwords here", "").lower()
