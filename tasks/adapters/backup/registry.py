"""Which backup driver a cluster runs: the one place that maps the inventory's `backup_tool` to a driver."""

from __future__ import annotations

from blocks.inventory import BackupTool, Inventory
from tasks.adapters.backup.base import BackupDriver
from tasks.adapters.backup.pgbackrest import PgBackRestDriver
from tasks.adapters.backup.walg import WalgDriver

DRIVERS: dict[BackupTool, type[BackupDriver]] = {BackupTool.pgbackrest: PgBackRestDriver, BackupTool.walg: WalgDriver}


def backup_driver(inv: Inventory) -> BackupDriver:
    return DRIVERS[inv.cluster.backup_tool]()
