"""The one place that builds and quotes remote commands.

Every remote command is an argv list, quoted by `shlex`, wrapped in coreutils `timeout` so a hung
program on a host cannot hang a flow, and optionally run as another user. Drivers (HA, backup)
return `Command` and `ManagedFile` values; the SSH adapter executes them. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from tasks.errors import BouwsteenError

DEFAULT_TIMEOUT = 60.0
# --norc: Debian's bash reads /etc/bash.bashrc when started over SSH even without a terminal, and
# under -u its `$PS1` test prints "PS1: unbound variable" into every script's stderr.
BASH = ("bash", "--norc", "-euo", "pipefail", "-c")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]*[$]?")


class CommandError(BouwsteenError, ValueError):
    """A command that cannot be built safely (bad env name, missing timeout, secret in argv)."""


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT
    user: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    # Exit codes that are an answer, not a failure (e.g. `pg_isready` 2 = "no response").
    ok_codes: tuple[int, ...] = (0,)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.argv:
            raise CommandError("empty command")
        if not (0 < self.timeout <= 24 * 3600):
            raise CommandError(f"timeout must be between 0 and 24 h, got {self.timeout}")
        if self.user is not None and not _USER_NAME.fullmatch(self.user):
            raise CommandError(f"invalid user name {self.user!r}")
        for name, _ in self.env:
            if not _ENV_NAME.fullmatch(name):
                raise CommandError(f"invalid environment variable name {name!r}")

    def render(self, *, sudo: bool = False) -> str:
        """The exact shell line sent over SSH.

        `sudo`: the login user is not root, so the whole line runs through `sudo -n` (never a
        password prompt: a refusal fails at once). `user` is then still switched with `runuser`
        under sudo's root, exactly as over a root login, rather than with `sudo -u`: one way to
        become a service user whoever logs in, and sudoers needs no rule per service user."""
        parts: list[str] = []
        if sudo:
            parts += ["sudo", "-n", "--"]
        # -k: a program that ignores SIGTERM is killed 5 s later.
        parts += ["timeout", "-k", "5", f"{self.timeout:g}"]
        if self.user:
            parts += ["runuser", "-u", self.user, "--"]
        if self.env:
            parts += ["env", *[f"{k}={v}" for k, v in self.env]]
        parts += list(self.argv)
        return shlex.join(parts)

    def __str__(self) -> str:
        return self.description or shlex.join(self.argv)


def cmd(
    *argv: str | int | float,
    timeout: float = DEFAULT_TIMEOUT,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    ok_codes: Sequence[int] = (0,),
    description: str = "",
) -> Command:
    """Build a command from arguments; each one is quoted, none is ever interpreted by a shell."""
    return Command(
        argv=tuple(str(a) for a in argv),
        timeout=timeout,
        user=user,
        env=tuple(sorted((env or {}).items())),
        ok_codes=tuple(ok_codes),
        description=description,
    )


def script(
    text: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    ok_codes: Sequence[int] = (0,),
    description: str = "",
    args: Sequence[str] = (),
) -> Command:
    """A short bash script (pipes, conditionals) as one quoted argument; positional args are quoted too.

    Inside the script, refer to `args` as "$1", "$2", ... so values never need inline quoting.
    """
    if not text.strip():
        raise CommandError("empty script")
    return cmd(
        *BASH, text, "bouwsteen", *args,
        timeout=timeout, user=user, env=env, ok_codes=ok_codes, description=description or text.strip().splitlines()[0],
    )


def chain(*commands: Command, description: str) -> Command:
    """Several commands in one round trip, stopping at the first failure.

    Each keeps its own rendering (timeout, user, env), so the chain is exactly the commands one by
    one, less the round trips; it runs as the session's user and times out when they all would have.
    """
    if not commands:
        raise CommandError("empty chain")
    lenient = [str(c) for c in commands if c.ok_codes != (0,)]
    if lenient:
        raise CommandError(f"cannot chain commands whose non-zero exits are answers: {lenient}")
    text = "\n".join(c.render() for c in commands)
    total = min(sum(c.timeout + 5 for c in commands), 24 * 3600)
    return Command(argv=(*BASH, text), timeout=total, description=description)


@dataclass(frozen=True)
class ManagedFile:
    """A file a flow owns on a host: written only when its content, owner or mode differ."""

    path: str
    content: str
    owner: str = "root"
    group: str | None = None
    mode: int = 0o644
    # Secret files are never logged or put in artifacts, and must not be group/world readable.
    secret: bool = False

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise CommandError(f"managed file path must be absolute: {self.path!r}")
        if self.secret and self.mode & 0o077:
            raise CommandError(f"{self.path}: a secret file must not be readable by group or others")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()

    @property
    def owner_group(self) -> str:
        return self.group or self.owner


@dataclass(frozen=True)
class Unit:
    """A systemd unit a driver wants enabled and running on a host."""

    name: str
    # Restart (not reload) when any of these files changed.
    restart_on: tuple[str, ...] = field(default_factory=tuple)
    reload_on: tuple[str, ...] = field(default_factory=tuple)
    # The OS package whose upgrade replaces what the unit runs (None: a file the flows write):
    # rolling_upgrade restarts the unit when that package changed and its maintainer script did not.
    package: str | None = None


@dataclass(frozen=True)
class CommandResult:
    """What a command printed and returned: the only input output parsers get."""

    stdout: str
    stderr: str = ""
    exit_code: int = 0
    # Wall time of the command itself, from sending it to its exit status (connection set-up excluded).
    seconds: float = 0.0
