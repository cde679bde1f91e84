"""Where bouwsteen keeps its state on the controller (the lab, Prefect's home, client reports)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "/var/lib/bouwsteen"


def bouwsteen_home() -> Path:
    return Path(os.environ.get("BOUWSTEEN_HOME", DEFAULT_HOME))
