"""Where the lab keeps its state on the controller. Nothing here is visible to lab hosts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bouwsteen.home import bouwsteen_home


@dataclass(frozen=True)
class LabPaths:
    root: Path

    @classmethod
    def default(cls) -> "LabPaths":
        return cls(bouwsteen_home())

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def lab(self) -> Path:
        return self.root / "lab"

    @property
    def hosts(self) -> Path:
        return self.lab / "hosts"

    def host(self, name: str) -> Path:
        return self.hosts / name

    @property
    def ssh_key(self) -> Path:
        return self.lab / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.lab / "known_hosts"

    @property
    def inventory(self) -> Path:
        return self.lab / "inventory.yaml"

    @property
    def state_file(self) -> Path:
        return self.lab / "lab.json"
