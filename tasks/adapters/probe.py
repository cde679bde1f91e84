"""A read-only snapshot of one host in one SSH round trip: OS, packages, files, units, ports, data dir.

The probe is a small Python program run by the host's own python3 (every Debian host has it);
it prints JSON that `parse_probe` turns into a `HostSnapshot` for the pure planners.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tasks.adapters.commands import Command, CommandResult, cmd
from tasks.errors import BouwsteenError

MARKER_PATH = "/etc/bouwsteen/cluster.json"

_PROBE = r'''
import hashlib, json, os, pwd, grp, subprocess, sys
args = json.loads(sys.argv[1])
out = {"hostname": os.uname().nodename}
osr = {}
try:
    for line in open("/etc/os-release"):
        k, _, v = line.strip().partition("=")
        osr[k] = v.strip('"')
except OSError:
    pass
out["os"] = {"id": osr.get("ID", ""), "version_id": osr.get("VERSION_ID", ""), "pretty": osr.get("PRETTY_NAME", "")}
pk = {p: None for p in args["packages"]}
if pk:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Package}\t${Version}\t${db:Status-Abbrev}\n", *pk],
                       capture_output=True, text=True)
    for line in r.stdout.splitlines():
        name, version, status = (line.split("\t") + ["", ""])[:3]
        if status.startswith("ii"):
            pk[name] = version
out["packages"] = pk
def state(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(65536), b""):
            h.update(chunk)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return {"sha256": h.hexdigest(), "owner": owner + ":" + group, "mode": st.st_mode & 0o7777}
out["files"] = {p: state(p) for p in args["files"]}
try:
    out["marker"] = json.load(open(args["marker"]))
except (OSError, ValueError):
    out["marker"] = None
dd = args["data_dir"]
entry = {"exists": os.path.isdir(dd), "entries": 0, "pg_version": None}
if entry["exists"]:
    names = os.listdir(dd)
    entry["entries"] = len(names)
    try:
        entry["pg_version"] = open(os.path.join(dd, "PG_VERSION")).read().strip()
    except OSError:
        pass
out["data_dir"] = entry
units = {}
for unit in args["units"]:
    r = subprocess.run(["systemctl", "show", "-p", "UnitFileState,ActiveState,MainPID,LoadState", unit],
                       capture_output=True, text=True)
    props = dict(l.split("=", 1) for l in r.stdout.splitlines() if "=" in l)
    units[unit] = {"enabled": props.get("UnitFileState", ""), "active": props.get("ActiveState", ""),
                   "main_pid": int(props.get("MainPID", "0") or 0), "loaded": props.get("LoadState", "")}
out["units"] = units
r = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True)
listeners = {}
for line in r.stdout.splitlines():
    parts = line.split()
    if len(parts) < 4:
        continue
    port = parts[3].rsplit(":", 1)[-1]
    proc = ""
    if "users:((" in line:
        proc = line.split('users:(("', 1)[1].split('"', 1)[0]
    if port.isdigit() and int(port) in args["ports"]:
        listeners.setdefault(port, proc)
out["listeners"] = listeners
tools = {}
for tool in args.get("tools", []):
    try:
        r = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=15)
        text = (r.stdout or r.stderr).strip()
        tools[tool] = text.splitlines()[0] if r.returncode == 0 and text else None
    except (OSError, subprocess.SubprocessError):
        tools[tool] = None
out["tools"] = tools
print(json.dumps(out))
'''


@dataclass(frozen=True)
class FileState:
    sha256: str
    owner: str
    mode: int


@dataclass(frozen=True)
class UnitState:
    enabled: str
    active: str
    main_pid: int
    loaded: str

    @property
    def is_running(self) -> bool:
        return self.active == "active"

    @property
    def is_enabled(self) -> bool:
        return self.enabled == "enabled"


@dataclass(frozen=True)
class DataDirState:
    exists: bool
    entries: int
    pg_version: str | None

    @property
    def is_empty(self) -> bool:
        return not self.exists or self.entries == 0


@dataclass(frozen=True)
class HostSnapshot:
    host: str
    hostname: str
    os_id: str
    os_version: str
    os_pretty: str
    packages: dict[str, str | None]
    files: dict[str, FileState | None]
    marker_cluster: str | None
    data_dir: DataDirState
    units: dict[str, UnitState]
    listeners: dict[int, str] = field(default_factory=dict)
    # `<tool> --version`, first line, for tools with a release floor; None when not installed.
    tools: dict[str, str | None] = field(default_factory=dict)


def probe_command(*, files: list[str], units: list[str], packages: list[str], data_dir: str, ports: list[int],
                  tools: list[str] = ()) -> Command:
    args = {"files": sorted(set(files)), "units": units, "packages": packages, "data_dir": data_dir,
            "ports": ports, "marker": MARKER_PATH, "tools": sorted(set(tools))}
    return cmd("python3", "-c", _PROBE, json.dumps(args), timeout=30, description="probe host state")


class ProbeOutputError(BouwsteenError, ValueError):
    """The host probe's output is not what the probe script prints."""


def parse_probe(host: str, result: CommandResult) -> HostSnapshot:
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise ProbeOutputError(f"{host}: host probe printed no JSON ({exc}): {result.stderr.strip()[-300:]}") from None
    try:
        return _snapshot(host, data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProbeOutputError(f"{host}: host probe output lacks {exc}") from None


def _snapshot(host: str, data: dict) -> HostSnapshot:
    marker = data.get("marker") or {}
    return HostSnapshot(
        host=host,
        hostname=data["hostname"],
        os_id=data["os"]["id"],
        os_version=data["os"]["version_id"],
        os_pretty=data["os"]["pretty"],
        packages=dict(data["packages"]),
        files={p: FileState(**s) if s else None for p, s in data["files"].items()},
        marker_cluster=marker.get("cluster") if isinstance(marker, dict) else None,
        data_dir=DataDirState(**data["data_dir"]),
        units={u: UnitState(**s) for u, s in data["units"].items()},
        listeners={int(p): name for p, name in data["listeners"].items()},
        tools=dict(data.get("tools") or {}),
    )
