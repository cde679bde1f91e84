"""postgres's SSH between database hosts (pgBackRest's backup from a standby): the files. Pure.

pgBackRest on a standby asks the primary, over SSH as postgres, to start and stop the backup: an
exec channel to `pgbackrest … remote` with stdin and stdout, nothing else (no pty, no forwarding,
no ~/.ssh/rc). So a peer's key is accepted with `restrict` (which turns all of those off, and
whatever OpenSSH restricts in the future) and `from=` the address it connects from.

Host keys come from the SSH block's known_hosts, the keys the controller itself verifies; that
file may be hashed (`HashKnownHosts yes`, `ssh-keygen -H`), so entries are matched the way
OpenSSH matches them: by the plain pattern, or by the HMAC-SHA1 of the name under its salt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

from tasks.errors import BouwsteenError

# One public key as ssh-keygen prints it: the type, the base64 blob, an optional comment.
_PUBLIC_KEY = re.compile(r"(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa) ([A-Za-z0-9+/]+={0,2})( [^\x00-\x1f\x7f]*)?")
_KEY_TYPES = frozenset({"ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                        "ssh-rsa", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"})


class PeerSshError(BouwsteenError, ValueError):
    """A peer's key or host key that cannot be trusted as given; the message names the host."""


@dataclass(frozen=True)
class Peer:
    name: str
    address: str
    port: int = 22

    @property
    def known_as(self) -> tuple[str, ...]:
        """The names OpenSSH looks this host up by when connecting by name or address."""
        if self.port == 22:
            return (self.name, self.address)
        return (f"[{self.name}]:{self.port}", f"[{self.address}]:{self.port}")


def public_key(name: str, text: str) -> tuple[str, str]:
    """(type, base64) of the one public key a host printed; anything else is refused, so a host
    cannot slip an option or a second line into its peers' authorized_keys."""
    line = text.strip()
    match = _PUBLIC_KEY.fullmatch(line)
    if match is None:
        raise PeerSshError(f"{name}: postgres's public key is not one OpenSSH public key line")
    try:
        blob = base64.b64decode(match.group(3), validate=True)
    except binascii.Error:
        raise PeerSshError(f"{name}: postgres's public key is not valid base64") from None
    # The blob starts with its own type (a length-prefixed string): it must be the one printed.
    length = int.from_bytes(blob[:4], "big")
    if blob[4:4 + length].decode("ascii", "replace") != match.group(1):
        raise PeerSshError(f"{name}: postgres's public key is not the {match.group(1)} key it says it is")
    return match.group(1), match.group(3)


def authorized_keys(keys: dict[str, tuple[str, str]], peers: list[Peer], *, for_host: str) -> str:
    """postgres's authorized_keys on `for_host`: every other peer's key, each from its own address
    only, restricted to running a command (what pgBackRest's remote needs)."""
    lines = ["# Managed by bouwsteen: pgBackRest's peers (backup from a standby); local edits are overwritten."]
    for peer in sorted(peers, key=lambda p: p.name):
        if peer.name == for_host:
            continue  # a host never logs in to itself: a backup on the primary runs locally
        key_type, blob = keys[peer.name]
        lines.append(f'restrict,from="{peer.address}" {key_type} {blob} postgres@{peer.name}')
    return "\n".join(lines) + "\n"


def _hashed_match(pattern: str, name: str) -> bool:
    """OpenSSH's hashed host pattern `|1|base64(salt)|base64(HMAC-SHA1(salt, name))`."""
    try:
        salt, digest = pattern[3:].split("|", 1)
        salt_bytes, digest_bytes = base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(hmac.new(salt_bytes, name.encode(), hashlib.sha1).digest(), digest_bytes)


def _matches(patterns: str, name: str) -> bool:
    name = name.lower()
    for pattern in patterns.split(","):
        if pattern.startswith("|1|"):
            if _hashed_match(pattern, name):
                return True
        elif pattern.lower() == name:
            return True
    return False


def host_keys(known_hosts: str, peer: Peer) -> list[tuple[str, str]]:
    """(type, base64) of every key known_hosts holds for `peer` (plain or hashed entries).

    Marker lines (`@revoked`, `@cert-authority`) and wildcard patterns are not taken: a peer
    trusts exactly the keys listed for it."""
    found: list[tuple[str, str]] = []
    for raw in known_hosts.splitlines():
        fields = raw.split()
        if len(fields) < 3 or fields[0].startswith(("#", "@")):
            continue
        patterns, key_type, blob = fields[0], fields[1], fields[2]
        if key_type not in _KEY_TYPES:
            continue
        if any(_matches(patterns, name) for name in peer.known_as) and (key_type, blob) not in found:
            found.append((key_type, blob))
    return found


def known_hosts(controller_known_hosts: str, peers: list[Peer]) -> str:
    """postgres's known_hosts: each peer's verified keys under its name and address, in plain
    form (the peers' names are in every host's configuration anyway). A peer without a key is
    an error here, not an empty file that fails the first backup from a standby."""
    lines = ["# Managed by bouwsteen: host keys of the database hosts, as the controller verifies them."]
    missing = []
    for peer in sorted(peers, key=lambda p: p.name):
        keys = host_keys(controller_known_hosts, peer)
        if not keys:
            missing.append(f"{peer.name} ({', '.join(peer.known_as)})")
        lines += [f"{','.join(peer.known_as)} {key_type} {blob}" for key_type, blob in keys]
    if missing:
        raise PeerSshError("the SSH block's known_hosts has no key for " + "; ".join(missing)
                           + ": add them (plain or hashed) and register the blocks again")
    return "\n".join(lines) + "\n"


def ssh_config(addresses: list[str]) -> str:
    """postgres's SSH client settings towards the other database hosts.

    A standby's backup opens one SSH connection to the primary per pgBackRest process (the main
    one and each worker): multiplexed over the first, the workers' connections take ~15 ms instead
    of a full handshake each (~0.2 s, all at once on a busy host). The shared connection outlives
    the backup by seconds only, and a dead peer ends it within ~6 s.
    """
    if not addresses:
        raise ValueError("peer_ssh_config: no peer addresses")
    return (
        "# Managed by bouwsteen; local edits are overwritten.\n"
        f"Host {' '.join(sorted(addresses))}\n"
        "    ControlMaster auto\n"
        "    ControlPath ~/.ssh/mux-%C\n"
        "    ControlPersist 5s\n"
        "    ServerAliveInterval 2\n"
        "    ServerAliveCountMax 3\n"
    )
