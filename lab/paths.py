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
        """The flows' key (registered in the SSH block): root on most hosts, the non-root login on
        a host with `ssh_user`."""
        return self.lab / "id_ed25519"

    @property
    def tool_key(self) -> Path:
        """The lab's own tooling key (`lab ssh`, the tests' helpers): root on every host, never
        registered for the flows."""
        return self.lab / "id_ed25519_lab"

    @property
    def known_hosts(self) -> Path:
        return self.lab / "known_hosts"

    @property
    def inventory(self) -> Path:
        return self.lab / "inventory.yaml"

    def cluster_dir(self, cluster: str) -> Path:
        """Inventory and secrets of a lab cluster other than the main one (the clone's target)."""
        return self.lab / cluster

    @property
    def state_file(self) -> Path:
        return self.lab / "lab.json"
