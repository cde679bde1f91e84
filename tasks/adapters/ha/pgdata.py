"""Where PostgreSQL's data directory (PGDATA) is: the one rule every driver asks.

The HA manager decides the layout, so the answer comes from its driver (`HaDriver.pgdata`):
Patroni runs PostgreSQL on `cluster.postgres.data_dir`, stolon on `<keeper data dir>/postgres`. A
backup tool that works the path out by itself ends up with a second, different directory for the
same cluster (WAL-G's `backup-push <dir>` refuses one that is not the server's `data_directory`).
"""

from __future__ import annotations

from blocks.inventory import Inventory
from tasks.adapters.ha.registry import ha_driver


def pgdata(inv: Inventory) -> str:
    """The directory the cluster's PostgreSQL runs on, on every database host."""
    return ha_driver(inv).pgdata(inv)
