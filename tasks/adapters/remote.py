"""Remote execution over SSH (Fabric), with verified host keys and typed errors.

- Host keys are checked against the given known_hosts text only; an unknown or changed key is
  refused (Fabric's default would add it silently).
- Every command comes from `tasks.adapters.commands` (quoted, with a remote timeout); the local
  side has its own deadline a little longer, so a dead network cannot hang a flow either.
- stdin is never attached: a program that prompts fails instead of waiting forever.
- Secret values are masked in every error message and log line this module produces.
"""

from __future__ import annotations

import io
import posixpath
import shlex
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Iterable

import paramiko
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut

from tasks.adapters.commands import Command, CommandResult, ManagedFile, script
from tasks.errors import BouwsteenError

TAIL_CHARS = 2000


@dataclass(frozen=True)
class SshTarget:
    host: str  # inventory name, for messages
    address: str
    port: int = 22
    user: str = "root"


@dataclass(frozen=True, repr=False)
class SshAuth:
    private_key: str
    known_hosts: str

    def __repr__(self) -> str:  # never show key material
        return "SshAuth(private_key=***, known_hosts=…)"


class Masker:
    def __init__(self, secrets: Iterable[str] = ()):
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "********")
        return text


class RemoteError(BouwsteenError):
    """A remote command failed. Carries host, the command, exit code and the tail of its output."""

    def __init__(self, host: str, command: str, exit_code: int | None, stdout: str = "", stderr: str = "", reason: str = ""):
        self.host = host
        self.command = command
        self.exit_code = exit_code
        self.stdout_tail = stdout[-TAIL_CHARS:]
        self.stderr_tail = stderr[-TAIL_CHARS:]
        self.reason = reason
        # Both: some tools report errors on stdout (pgBackRest's console), and a chain's stderr may
        # hold only an earlier step's warnings.
        tail = "\n".join(t for t in (self.stderr_tail.strip(), self.stdout_tail.strip()) if t)
        what = reason or f"exit code {exit_code}"
        super().__init__(f"{host}: `{command}` failed: {what}" + (f"\n{tail}" if tail else ""))


class RemoteUnreachable(RemoteError):
    """Could not connect or the connection broke: worth retrying with backoff."""


class RemoteTimeout(RemoteError):
    """The command ran past its deadline (killed on the host by `timeout`)."""


class HostKeyRejected(RemoteError):
    """The host's key is unknown or differs from known_hosts: never retry, never accept."""


def _load_private_key(text: str) -> paramiko.PKey:
    errors = []
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return key_class.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError) as exc:
            errors.append(f"{key_class.__name__}: {exc}")
    raise ValueError("SSH private key could not be read (" + "; ".join(errors) + ")")


def _host_keys(known_hosts: str) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    for line in known_hosts.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        if entry is None or entry.key is None:
            continue
        for name in entry.hostnames:
            keys.add(name, entry.key.get_name(), entry.key)
    return keys


class RemoteHost:
    """One SSH connection to one host. Open it inside a task; close it (or use `with`) after."""

    def __init__(self, target: SshTarget, auth: SshAuth, masker: Masker | None = None, connect_timeout: float = 10):
        self.target = target
        self.mask = masker or Masker()
        self._sudo = target.user != "root"
        config = Config(overrides={"load_ssh_configs": False, "run": {"hide": True, "warn": True, "in_stream": False}})
        self._conn = Connection(
            host=target.address,
            user=target.user,
            port=target.port,
            config=config,
            connect_timeout=connect_timeout,
            connect_kwargs={
                "pkey": _load_private_key(auth.private_key),
                "look_for_keys": False,
                "allow_agent": False,
                "banner_timeout": connect_timeout,
                "auth_timeout": connect_timeout,
            },
        )
        client = self._conn.client
        # Only the known_hosts we were given counts; the controller's own ~/.ssh does not.
        client._system_host_keys = paramiko.HostKeys()  # noqa: SLF001 - paramiko has no public setter
        trusted = _host_keys(auth.known_hosts)
        own = client.get_host_keys()
        own.clear()
        for hostname in trusted.keys():
            for key_type, key in trusted[hostname].items():
                own.add(hostname, key_type, key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())

    # ------------------------------------------------------------------ connection

    def __enter__(self) -> "RemoteHost":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:  # closing a broken connection must not hide the real error
            pass

    def _ensure_open(self, description: str) -> None:
        if self._conn.is_connected:
            return
        try:
            self._conn.open()
        except paramiko.BadHostKeyException as exc:
            raise HostKeyRejected(
                self.target.host, description, None,
                reason=f"host key of {self.target.address} CHANGED (got {exc.key.get_name()} "
                f"{exc.key.fingerprint}); refusing to connect",
            ) from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise HostKeyRejected(
                    self.target.host, description, None,
                    reason=f"host key of {self.target.address} is not in known_hosts; refusing to connect",
                ) from None
            raise RemoteUnreachable(self.target.host, description, None, reason=f"SSH error: {exc}") from None
        except (socket.timeout, TimeoutError) as exc:
            raise RemoteUnreachable(self.target.host, description, None, reason=f"connect timed out: {exc}") from None
        except (OSError, paramiko.ssh_exception.NoValidConnectionsError) as exc:
            raise RemoteUnreachable(self.target.host, description, None, reason=f"cannot connect: {exc}") from None

    # ------------------------------------------------------------------ commands

    def run(self, command: Command, *, check: bool = True) -> CommandResult:
        line = command.render(sudo=self._sudo)
        shown = self.mask(str(command))
        self._ensure_open(shown)
        started = time.monotonic()
        try:
            result = self._conn.run(line, timeout=command.timeout + 15)
        except CommandTimedOut as exc:
            raise RemoteTimeout(
                self.target.host, shown, None, self.mask(exc.result.stdout) if exc.result else "",
                reason=f"no answer within {command.timeout + 15:.0f}s",
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.close()
            raise RemoteUnreachable(self.target.host, shown, None, reason=f"connection lost: {exc}") from None
        outcome = CommandResult(stdout=result.stdout, stderr=result.stderr, exit_code=result.exited,
                                seconds=time.monotonic() - started)
        if result.exited == 124 and time.monotonic() - started >= command.timeout * 0.9:
            raise RemoteTimeout(
                self.target.host, shown, 124, self.mask(result.stdout), self.mask(result.stderr),
                reason=f"timed out after {command.timeout:g}s",
            )
        if result.exited == -1:
            # invoke reports -1 when the channel closed without an exit status: the link died.
            self.close()
            raise RemoteUnreachable(self.target.host, shown, None, reason="connection closed without exit status")
        if check and result.exited not in command.ok_codes:
            raise RemoteError(self.target.host, shown, result.exited, self.mask(result.stdout), self.mask(result.stderr))
        return outcome

    # ------------------------------------------------------------------ files

    def read_file(self, path: str, *, missing_ok: bool = True) -> str | None:
        result = self.run(
            script('if [ -e "$1" ]; then cat -- "$1"; else exit 3; fi', args=[path], ok_codes=(0, 3),
                   description=f"read {path}"),
        )
        if result.exit_code == 3:
            if missing_ok:
                return None
            raise RemoteError(self.target.host, f"read {path}", 3, reason="no such file")
        return result.stdout

    def file_state(self, path: str) -> tuple[str, str, int] | None:
        """(sha256, owner:group, mode) of a file, or None when it does not exist."""
        result = self.run(
            script(
                'if [ -f "$1" ]; then sha256sum -- "$1" | cut -d" " -f1; stat -c "%U:%G %a" -- "$1"; else exit 3; fi',
                args=[path], ok_codes=(0, 3), description=f"stat {path}",
            ),
        )
        if result.exit_code == 3:
            return None
        digest, rest = result.stdout.strip().split("\n", 1)
        owner, mode = rest.split()
        return digest, owner, int(mode, 8)

    def ensure_file(self, spec: ManagedFile) -> bool:
        """Write `spec` unless the host already has exactly it. Returns True when something changed.

        The new content goes to a root-only staging file, gets its owner and mode, then replaces
        the target with an atomic rename: readers never see a half-written or world-readable file.
        """
        wanted_owner = f"{spec.owner}:{spec.owner_group}"
        current = self.file_state(spec.path)
        if current == (spec.sha256, wanted_owner, spec.mode):
            return False
        if current is not None and current[0] == spec.sha256:
            self.run(script('chown "$1" "$3" && chmod "$2" "$3"', args=[wanted_owner, f"{spec.mode:o}", spec.path],
                            description=f"fix owner/mode of {spec.path}"))
            return True
        self._ensure_open(f"upload {spec.path}")
        staging_dir = "/root/.bouwsteen-staging" if not self._sudo else f"/home/{self.target.user}/.bouwsteen-staging"
        staged = posixpath.join(staging_dir, uuid.uuid4().hex)
        self.run(script('umask 077 && mkdir -p "$1" && chmod 700 "$1"', args=[staging_dir],
                        description="prepare staging dir"))
        try:
            sftp = self._conn.sftp()
            with sftp.open(staged, "wb") as remote_file:
                remote_file.chmod(0o600)
                remote_file.write(spec.content.encode())
        except (OSError, paramiko.SSHException) as exc:
            raise RemoteUnreachable(self.target.host, f"upload {spec.path}", None, reason=f"sftp failed: {exc}") from None
        self.run(
            script(
                '(umask 022; mkdir -p -- "$(dirname -- "$4")"); umask 077; tmp="$4.bouwsteen-new"; '
                'install -o "${2%%:*}" -g "${2#*:}" -m "$3" -- "$1" "$tmp" && mv -f -- "$tmp" "$4"; rm -f -- "$1"',
                args=[staged, wanted_owner, f"{spec.mode:o}", spec.path],
                description=f"install {spec.path}",
            )
        )
        return True

    def remove_file(self, path: str) -> bool:
        result = self.run(script('if [ -e "$1" ]; then rm -f -- "$1"; echo removed; fi', args=[path],
                                 description=f"remove {path}"))
        return "removed" in result.stdout


def quote(value: str) -> str:
    return shlex.quote(value)
