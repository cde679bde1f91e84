"""OS packages on a host, through apt: what is installed, what apt could install, the install.

Only commands and parsers; nothing here runs anything. Versions are Debian versions, compared the
way dpkg compares them (epoch, upstream, revision; `~` sorts before anything, even the end).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from tasks.adapters.commands import Command, CommandResult, cmd
from tasks.errors import BouwsteenError

# Debian policy 5.6.1 and 5.6.12: a package name, and a version [epoch:]upstream[-revision].
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_VERSION = re.compile(r"(?:[0-9]+:)?[0-9][A-Za-z0-9.+~:-]*")
_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
DPKG_STATUS = "/var/lib/dpkg/status"


class PackageSpecError(BouwsteenError, ValueError):
    """A requested package or version that cannot be right; the message names the field."""


def validate_targets(packages: Mapping[str, str] | None) -> dict[str, str]:
    """{"patroni": "4.1.5-2", ...}, checked before anything reads a host. Exact versions only: a
    roll that resolved "newest" per host could leave two releases in one cluster."""
    if not packages:
        raise PackageSpecError("packages: name at least one package and its target version, "
                               'like {"patroni": "4.1.5-2"}')
    problems = []
    for name, version in packages.items():
        if not isinstance(name, str) or not _PACKAGE_NAME.fullmatch(name):
            problems.append(f"packages: {name!r} is not a Debian package name")
        elif not isinstance(version, str) or not _VERSION.fullmatch(version) or version.endswith((":", "-")):
            problems.append(f"packages.{name}: {version!r} is not a Debian version (like 4.1.5-2 or 1:2.3-1)")
    if problems:
        raise PackageSpecError(*problems)
    return dict(packages)


def _split(version: str) -> tuple[int, str, str]:
    epoch, _, rest = version.partition(":") if ":" in version else ("0", "", version)
    upstream, dash, revision = rest.rpartition("-")
    if not dash:
        upstream, revision = rest, ""
    return int(epoch or 0), upstream, revision


def _order(char: str) -> int:
    if char == "~":
        return -1
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _compare_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i, j = i + 1, j + 1
        si, sj = i, j
        while i < len(a) and a[i].isdigit():
            i += 1
        while j < len(b) and b[j].isdigit():
            j += 1
        da, db = int(a[si:i] or 0), int(b[sj:j] or 0)
        if da != db:
            return -1 if da < db else 1
    return 0


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as dpkg --compare-versions orders a and b."""
    ea, ua, ra = _split(a)
    eb, ub, rb = _split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def upstream_version(version: str) -> str:
    """4.1.5-2 → 4.1.5: what the program itself reports as its release."""
    return _split(version)[1]


@dataclass(frozen=True)
class PackageState:
    """apt's view of one package on one host: installed (None: not installed), the candidate, and
    every version some source offers (the dpkg status file is not a source)."""

    name: str
    installed: str | None
    candidate: str | None
    available: tuple[str, ...] = ()


_HEADER = re.compile(r"^(\S+):$")
_FIELD = re.compile(r"^  (Installed|Candidate): (\S+)$")
_VERSION_ROW = re.compile(r"^ (?:\*\*\*|   ) (\S+) (-?\d+)$")
_SOURCE_ROW = re.compile(r"^ {8}-?\d+ (.+)$")


def parse_policy(text: str) -> dict[str, PackageState]:
    """`apt-cache policy NAME...` (C locale). A name apt does not know at all is absent."""
    found: dict[str, dict] = {}
    current: dict | None = None
    version: str | None = None
    for line in text.splitlines():
        line = line.rstrip()
        if match := _HEADER.match(line):
            current = found.setdefault(match.group(1), {"installed": None, "candidate": None, "sources": {}})
            version = None
        elif current is None:
            continue
        elif match := _FIELD.match(line):
            value = None if match.group(2) == "(none)" else match.group(2)
            current[match.group(1).lower()] = value
        elif match := _VERSION_ROW.match(line):
            version = match.group(1)
            current["sources"].setdefault(version, [])
        elif (match := _SOURCE_ROW.match(line)) and version is not None:
            current["sources"][version].append(match.group(1).strip())
    return {name: PackageState(name, info["installed"], info["candidate"],
                               tuple(v for v, sources in info["sources"].items()
                                     if any(s != DPKG_STATUS for s in sources)))
            for name, info in found.items()}


def refresh_command() -> Command:
    """The package lists read afresh from the host's sources (changes only apt's lists)."""
    return cmd("apt-get", "update", "-qq", timeout=600, env=_APT_ENV, description="apt-get update")


def policy_command(names: Sequence[str]) -> Command:
    return cmd("apt-cache", "policy", *names, timeout=60, env={"LC_ALL": "C"},
               description=f"apt-cache policy {' '.join(names)}")


def install_command(targets: Mapping[str, str]) -> Command:
    """Exactly these versions, nothing recommended, the host's changed configuration files kept.
    apt refuses a downgrade without --allow-downgrades; the plan refuses one before."""
    pinned = [f"{name}={version}" for name, version in sorted(targets.items())]
    return cmd("apt-get", "install", "-y", "-qq", "--no-install-recommends",
               "-o", "Dpkg::Options::=--force-confold", "-o", "Dpkg::Options::=--force-confdef", *pinned,
               timeout=1800, env=_APT_ENV, description=f"apt-get install {' '.join(pinned)}")


def unit_starts_command(units: Sequence[str]) -> Command:
    """When each unit's main process started (monotonic µs; 0 when not running): a package's
    maintainer script may restart its service itself, and a second restart would cost a second outage."""
    return cmd("systemctl", "show", "--property=Id,ExecMainStartTimestampMonotonic", *units, timeout=30,
               description="read when services started")


def parse_unit_starts(result: CommandResult) -> dict[str, int]:
    starts: dict[str, int] = {}
    # One block per unit, blank-line separated, properties in systemd's order rather than ours.
    for block in result.stdout.split("\n\n"):
        fields = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        if fields.get("Id"):
            starts[fields["Id"].strip()] = int(fields.get("ExecMainStartTimestampMonotonic", "0").strip() or 0)
    return starts
