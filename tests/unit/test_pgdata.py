"""tasks/adapters/ha/pgdata.py: the one answer to "where is PGDATA" per HA manager."""

from __future__ import annotations

from typing import Any

import pytest

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.backup.walg import WalgDriver
from tasks.adapters.ha.pgdata import pgdata
from tasks.adapters.ha.stolon import StolonDriver


def make_inventory(**cluster: Any) -> Inventory:
    base: dict[str, Any] = {"name": "bouw", "network": "10.0.0.0/24", "postgres": {"version": 15}}
    base.update(cluster)
    return parse_inventory({
        "cluster": base,
        "hosts": [
            *({"name": f"db{i}", "address": f"10.0.0.1{i}", "roles": ["db"]} for i in (1, 2, 3)),
            {"name": "backup1", "address": "10.0.0.20", "roles": ["backup"]},
        ],
    })


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        ({"ha_manager": "patroni"}, "/var/lib/postgresql/15/main"),
        ({"ha_manager": "patroni", "postgres": {"version": 16, "data_directory": "/srv/pg/16"}}, "/srv/pg/16"),
        # The keeper's --data-dir holds keeperstate, dbstate, lock and PostgreSQL's own directory "postgres".
        ({"ha_manager": "stolon"}, "/var/lib/stolon/bouw/postgres"),
        ({"ha_manager": "stolon", "postgres": {"version": 15, "data_directory": "/srv/stolon"}},
         "/srv/stolon/postgres"),
    ],
    ids=["patroni-default", "patroni-set", "stolon-default", "stolon-set"],
)
def test_pgdata_per_ha_manager(cluster: dict[str, Any], expected: str) -> None:
    assert pgdata(make_inventory(**cluster)) == expected


@pytest.mark.parametrize(
    "postgres",
    [{"version": 15}, {"version": 15, "data_directory": "/var/lib/pgsql/15/data"}],
    ids=["data_directory-unset", "data_directory-set"],
)
def test_walg_and_stolon_agree_on_one_data_directory(postgres: dict[str, Any]) -> None:
    inv = make_inventory(
        ha_manager="stolon", backup_tool="walg", postgres=postgres,
        object_store={"host": "backup1", "endpoint": "https://backup1.example:9000", "bucket": "pg-backups"},
    )
    backed_up = WalgDriver().backup_command(inv, inv.host("db2"), inv.host("db1")).argv[-1]
    assert backed_up == StolonDriver().pgdata(inv) == pgdata(inv)


def test_stolon_rule_comes_from_the_stolon_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    # pgdata() asks StolonDriver rather than repeating its layout: change the driver, change the answer.
    monkeypatch.setattr(StolonDriver, "pgdata", lambda self, inv: "/elsewhere/postgres")
    assert pgdata(make_inventory(ha_manager="stolon")) == "/elsewhere/postgres"
    assert pgdata(make_inventory(ha_manager="patroni")) == "/var/lib/postgresql/15/main"
