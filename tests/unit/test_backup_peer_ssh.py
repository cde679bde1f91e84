"""postgres's SSH between database hosts (pgBackRest's backups from a standby): client settings,
authorized_keys (restrict, from=) and known_hosts built from a plain or hashed controller file."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest

from tasks.adapters import peer_ssh
from tasks.adapters.peer_ssh import Peer, PeerSshError
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


# ----------------------------------------------------------------------------- authorized_keys and known_hosts

needs_openssh = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
PEER_HOSTS = [Peer("pg1", "172.29.66.11"), Peer("pg2", "172.29.66.12"), Peer("pg3", "172.29.66.13")]


def keygen(tmp_path, name: str) -> str:
    path = tmp_path / f"key-{name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(path)], check=True)
    return (tmp_path / f"key-{name}.pub").read_text()


@pytest.fixture
def host_keys(tmp_path) -> dict[str, str]:
    return {p.name: " ".join(keygen(tmp_path, p.name).split()[:2]) for p in PEER_HOSTS}


def controller_known_hosts(tmp_path, host_keys: dict[str, str], *, hashed: bool) -> str:
    lines = [f"{p.name},{p.name}.bouwsteen.lab,{p.address} {host_keys[p.name]}" for p in PEER_HOSTS]
    path = tmp_path / "known_hosts"
    path.write_text("# the controller's\n" + "\n".join(lines) + "\n")
    if hashed:
        subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)
    return path.read_text()


@needs_openssh
@pytest.mark.parametrize("hashed", [False, True], ids=["plain", "hashed"])
def test_peer_known_hosts_from_the_controllers_file(tmp_path, host_keys, hashed: bool) -> None:
    source = controller_known_hosts(tmp_path, host_keys, hashed=hashed)
    if hashed:
        assert "172.29.66.11" not in source and source.count("|1|") == 9  # one hashed line per name
    out = tmp_path / "peer_known_hosts"
    out.write_text(peer_ssh.known_hosts(source, PEER_HOSTS))
    for peer in PEER_HOSTS:
        # What OpenSSH on a peer finds for the address pgBackRest connects to, and for the name.
        for name in (peer.address, peer.name):
            found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(out)], capture_output=True, text=True)
            assert found.returncode == 0, f"{name} not found"
            assert host_keys[peer.name] in found.stdout
            others = [k for n, k in host_keys.items() if n != peer.name]
            assert not any(k in found.stdout for k in others)


@needs_openssh
def test_hashed_known_hosts_on_another_port(tmp_path, host_keys) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"[172.29.66.11]:2222 {host_keys['pg1']}\n172.29.66.11 {host_keys['pg2']}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)
    on_2222 = Peer("pg1", "172.29.66.11", 2222)
    assert peer_ssh.host_keys(path.read_text(), on_2222) == [tuple(host_keys["pg1"].split())]
    assert peer_ssh.known_hosts(path.read_text(), [on_2222]).splitlines()[1] == \
        f"[pg1]:2222,[172.29.66.11]:2222 {host_keys['pg1']}"


def test_a_peer_without_a_host_key_is_an_error_not_an_empty_file() -> None:
    text = "pg1,172.29.66.11 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBB\n"
    with pytest.raises(PeerSshError, match=r"no key for pg2 \(pg2, 172.29.66.12\); pg3"):
        peer_ssh.known_hosts(text, PEER_HOSTS)


@pytest.mark.parametrize("line", [
    "@revoked pg1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBB",
    "@cert-authority *.bouwsteen.lab ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBB",
    "pg* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBB",  # a wildcard is not a listed key
    "pg10,172.29.66.111 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBB",  # a longer name is another host
    "|1|notbase64!|x ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBB",
    "pg1",
])
def test_lines_that_list_no_key_for_the_peer(line: str) -> None:
    assert peer_ssh.host_keys(line + "\n", Peer("pg1", "172.29.66.11")) == []


@needs_openssh
def test_authorized_keys_restrict_each_peer_to_its_address(tmp_path) -> None:
    keys = {p.name: peer_ssh.public_key(p.name, keygen(tmp_path, p.name)) for p in PEER_HOSTS}
    text = peer_ssh.authorized_keys(keys, PEER_HOSTS, for_host="pg2")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [f'restrict,from="172.29.66.11" {" ".join(keys["pg1"])} postgres@pg1',
                     f'restrict,from="172.29.66.13" {" ".join(keys["pg3"])} postgres@pg3']
    # OpenSSH reads the file, options and all.
    path = tmp_path / "authorized_keys"
    path.write_text(text)
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, check=True)
    assert len(listed.stdout.splitlines()) == 2


@pytest.mark.parametrize("printed", [
    "",
    "ssh-ed25519",
    "ssh-ed25519 AAAA\nssh-ed25519 BBBB",  # a second line
    'command="sh" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBB',  # an option smuggled in front
    "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
    "ssh-ed25519 AAAA=A",
    "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f",  # an ed25519 blob said to be rsa
])
def test_a_peer_key_that_is_not_one_public_key_is_refused(printed: str) -> None:
    with pytest.raises(PeerSshError, match="pg1"):
        peer_ssh.public_key("pg1", printed)


ED25519_BLOB = base64.b64encode(b"\0\0\0\x0bssh-ed25519\0\0\0\x20" + bytes(range(32))).decode()


def test_the_printed_comment_is_not_trusted() -> None:
    key_type, blob = peer_ssh.public_key("pg1", f"ssh-ed25519 {ED25519_BLOB} postgres@evil from=\"*\"\n")
    text = peer_ssh.authorized_keys({"pg1": (key_type, blob), "pg2": (key_type, blob)}, PEER_HOSTS[:2], for_host="pg2")
    assert "evil" not in text and text.splitlines()[1].endswith(" postgres@pg1")
