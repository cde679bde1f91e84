"""Which HA driver a cluster runs: the one place that maps the inventory's `ha_manager` to a driver."""

from __future__ import annotations

from blocks.inventory import HaManager, Inventory
from tasks.adapters.ha.base import HaDriver
from tasks.adapters.ha.patroni import PatroniDriver
from tasks.adapters.ha.stolon import StolonDriver

DRIVERS: dict[HaManager, type[HaDriver]] = {HaManager.patroni: PatroniDriver, HaManager.stolon: StolonDriver}


def ha_driver(inv: Inventory) -> HaDriver:
    return DRIVERS[inv.cluster.ha_manager]()
