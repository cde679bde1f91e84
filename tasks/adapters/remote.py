"""Remote execution over SSH (Fabric), with verified host keys and typed errors.

- Host keys are checked against the given known_hosts text only; an unknown or changed key is
  refused (Fabric's default would add it silently).
- Every command comes from `tasks.adapters.commands` (quoted, with a remote timeout); the local
  side has its own deadline a little longer, so a dead network cannot hang a flow either.
- stdin is never attached: a program that prompts fails instead of waiting forever.
- Secret values are masked in every error message and log line this module produces.
- The login user need not be root. A plain user runs every command through `sudo -n` (it needs
  passwordless sudo; a refusal is `SudoRefused`, never retried); `Command.user` still switches
  users with `runuser` after sudo, so the program runs the same way as over a root login. Files
  are uploaded over SFTP into a staging folder the login user owns (0700 in its home), then
  installed into place by root: their content is never on a command line. A refused transfer is
  `UploadFailed`, which is not transient either.
"""

from __future__ import annotations

import io
import posixpath
import re
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


class LoginRefused(RemoteError):
    """The host refused the key for that user: a wrong key or user in the credentials, never
    something a retry fixes."""


class SudoRefused(RemoteError):
    """The login user may not run the command through `sudo -n` (sudo missing, a password
    required, not in sudoers): the command never ran, and a retry would be refused the same way."""


class UploadFailed(RemoteError):
    """The host refused a file: its staging folder is not the login user's, SFTP is refused or
    missing, permission denied, a full disk. Not transient: the same upload fails the same way."""


STAGING_DIR = ".bouwsteen-staging"
# What sudo itself prints when it will not run a command (as opposed to the command's own errors):
# its own "sudo: …" errors, and the two refusals it words without that prefix.
_SUDO_REFUSAL = re.compile(r"sudo: .*|.* is not in the sudoers file.*|Sorry, user \S+ (is not allowed|may not run sudo).*")
# What sudo prints and then runs the command all the same.
_SUDO_WARNINGS = ("sudo: unable to resolve host", "sudo: warning:", "sudo: setrlimit")
_SUDO_MISSING = re.compile(r"\bsudo: (command )?not found")


def sudo_refusal(exit_code: int | None, stderr: str) -> str | None:
    """sudo's own refusal in a command's outcome (its first line), or None when sudo ran the
    command. sudo exits 1 when it refuses; a shell without sudo exits 127. A warning sudo gives
    before running the command (an unresolvable host name) is no refusal, whatever the command's
    own exit code."""
    if exit_code == 1:
        for line in stderr.splitlines():
            line = line.strip()
            if _SUDO_REFUSAL.fullmatch(line) and not line.startswith(_SUDO_WARNINGS):
                return line
    if exit_code == 127 and _SUDO_MISSING.search(stderr):
        return "sudo is not installed on the host"
    return None


def staging_command() -> Command:
    """Run as the login user (never through sudo): its own staging folder, 0700, printed back.

    A folder that is not the login user's own (left by root, or a symlink) is refused: uploading
    into it would fail, or write where someone else decides."""
    return script(
        'd="$HOME/$1"; umask 077; [ -e "$d" ] || [ -L "$d" ] || mkdir -- "$d" || true\n'
        'if [ -L "$d" ] || [ ! -d "$d" ] || [ ! -O "$d" ]; then\n'
        '  echo "$d is not a folder owned by $(id -un); remove it so it can be made again" >&2; exit 3\n'
        'fi\n'
        'chmod 700 -- "$d"\n'
        # Leftovers of uploads a broken connection interrupted (a day old: never one in flight).
        'find "$d" -maxdepth 1 -type f -mmin +1440 -delete 2>/dev/null || true\n'
        'printf "%s\\n" "$d"',
        args=[STAGING_DIR], ok_codes=(0, 3), timeout=30, description="prepare the staging folder")


def install_command(staged: str, spec: ManagedFile) -> Command:
    """Run as root: `staged` (the uploaded copy) installed with the spec's owner and mode beside
    the target, then renamed over it (readers never see a half-written or too-readable file).
    The staged copy is removed whatever happens."""
    return script(
        'trap \'rm -f -- "$1"\' EXIT\n'
        '(umask 022; mkdir -p -- "$(dirname -- "$4")")\n'
        'umask 077; tmp="$4.bouwsteen-new"\n'
        'install -o "${2%%:*}" -g "${2#*:}" -m "$3" -- "$1" "$tmp"\n'
        'mv -f -- "$tmp" "$4"',
        args=[staged, f"{spec.owner}:{spec.owner_group}", f"{spec.mode:o}", spec.path],
        description=f"install {spec.path}",
    )


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
        self._staging: str | None = None
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
        self._staging = None
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
        except paramiko.AuthenticationException as exc:
            if "timeout" in str(exc).lower():
                # paramiko's "Authentication timeout.": no answer in time (a busy or cut-off host).
                raise RemoteUnreachable(self.target.host, description, None, reason=f"SSH error: {exc}") from None
            raise LoginRefused(
                self.target.host, description, None,
                reason=f"{self.target.address} refused the SSH key for user {self.target.user} ({exc})",
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

    def _transport_alive(self) -> bool:
        transport = self._conn.transport
        return transport is not None and transport.is_active()

    def run(self, command: Command, *, check: bool = True, as_login_user: bool = False) -> CommandResult:
        """Run `command` as root (through `sudo -n` for a plain login user), or, with
        `as_login_user`, as the login user itself (then `command.user` cannot be honoured)."""
        if as_login_user and command.user:
            raise ValueError(f"{command}: switching to {command.user} needs root; not as the login user")
        privileged = self._sudo and not as_login_user
        line = command.render(sudo=privileged)
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
        refusal = sudo_refusal(result.exited, result.stderr) if privileged else None
        if refusal:
            # Before ok_codes: the command never ran, whatever exit codes it would have answered with.
            raise SudoRefused(
                self.target.host, shown, result.exited, stderr=self.mask(result.stderr),
                reason=f"{self.target.user} may not run it through `sudo -n` ({self.mask(refusal)}); "
                       "the login user needs passwordless sudo",
            )
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

        The new content goes over SFTP to a 0600 file in the login user's own 0700 staging folder
        (never onto a command line); root then installs it with its owner and mode beside the
        target and renames it over the target: readers never see a half-written or world-readable
        file. As a plain login user only the install runs through sudo.
        """
        wanted_owner = f"{spec.owner}:{spec.owner_group}"
        current = self.file_state(spec.path)
        if current == (spec.sha256, wanted_owner, spec.mode):
            return False
        if current is not None and current[0] == spec.sha256:
            self.run(script('chown "$1" "$3" && chmod "$2" "$3"', args=[wanted_owner, f"{spec.mode:o}", spec.path],
                            description=f"fix owner/mode of {spec.path}"))
            return True
        staged = posixpath.join(self._staging_dir(spec.path), uuid.uuid4().hex)
        try:
            sftp = self._conn.sftp()
            with sftp.open(staged, "wb") as remote_file:
                remote_file.chmod(0o600)
                remote_file.write(spec.content.encode())
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if not self._transport_alive():
                self.close()
                raise RemoteUnreachable(self.target.host, f"upload {spec.path}", None,
                                        reason=f"connection lost during the upload: {exc}") from None
            raise UploadFailed(
                self.target.host, f"upload {spec.path}", None,
                reason=f"SFTP as {self.target.user} to {staged} refused: {str(exc) or type(exc).__name__}",
            ) from None
        self.run(install_command(staged, spec))
        return True

    def _staging_dir(self, path: str) -> str:
        """The login user's own staging folder (made once per connection)."""
        if self._staging is None:
            result = self.run(staging_command(), as_login_user=True)
            if result.exit_code == 3:
                raise UploadFailed(self.target.host, f"upload {path}", 3, stderr=self.mask(result.stderr),
                                   reason=f"no staging folder of {self.target.user}'s own")
            staged = result.stdout.strip()
            if not staged.startswith("/"):
                raise UploadFailed(self.target.host, f"upload {path}", 0,
                                   reason=f"the staging folder's path came back as {staged!r}")
            self._staging = staged
        return self._staging

    def remove_file(self, path: str) -> bool:
        result = self.run(script('if [ -e "$1" ]; then rm -f -- "$1"; echo removed; fi', args=[path],
                                 description=f"remove {path}"))
        return "removed" in result.stdout


def quote(value: str) -> str:
    return shlex.quote(value)
