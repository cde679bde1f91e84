"""postgres's SSH client settings between database hosts (pgBackRest's backups from a standby)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tasks.backup import peer_ssh_config

PEERS = ["172.29.66.12", "172.29.66.11", "172.29.66.13"]


def effective(config_file, host: str) -> dict[str, str]:
    """What OpenSSH itself makes of the file for `host` (`ssh -G` resolves, it does not connect)."""
    out = subprocess.run(["ssh", "-G", "-F", str(config_file), host], capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
@pytest.mark.parametrize(
    ("host", "multiplexed"),
    [("172.29.66.11", True), ("172.29.66.13", True), ("172.29.66.14", False), ("backup1", False)],
)
def test_openssh_multiplexes_to_the_peers_only(tmp_path, host: str, multiplexed: bool) -> None:
    config = tmp_path / "config"
    config.write_text(peer_ssh_config(PEERS))
    settings = effective(config, host)
    assert (settings["controlmaster"] == "auto") is multiplexed
    if multiplexed:
        assert settings["controlpersist"] == "5"
        assert "/.ssh/mux-" in settings["controlpath"]  # in postgres's own 0700 directory
        assert settings["serveraliveinterval"] == "2" and settings["serveralivecountmax"] == "3"


def test_the_peer_list_is_sorted_so_a_rerun_writes_the_same_file() -> None:
    assert peer_ssh_config(PEERS) == peer_ssh_config(sorted(PEERS, reverse=True))
    assert "Host 172.29.66.11 172.29.66.12 172.29.66.13\n" in peer_ssh_config(PEERS)


def test_no_peers_is_an_error_not_a_match_everything_block() -> None:
    with pytest.raises(ValueError):
        peer_ssh_config([])
