"""tasks/adapters/probe.py: the probe command, its parser, and the probe script itself run locally."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.adapters.commands import CommandResult
from tasks.adapters.probe import (
    MARKER_PATH,
    DataDirState,
    FileState,
    HostSnapshot,
    UnitState,
    parse_probe,
    probe_command,
)

PROBE_ARGS = dict(
    files=["/etc/patroni/config.yml", "/etc/bouwsteen/cluster.json", "/etc/patroni/config.yml"],
    units=["etcd.service", "patroni.service"],
    packages=["postgresql-15", "patroni", "pgbackrest"],
    data_dir="/var/lib/postgresql/15/main",
    ports=[5432, 8008, 2379, 2380],
)


def test_probe_command_shape() -> None:
    c = probe_command(**PROBE_ARGS)
    assert c.argv[:2] == ("python3", "-c")
    assert len(c.argv) == 4
    assert c.timeout == 30
    assert c.user is None
    assert c.description == "probe host state"
    assert json.loads(c.argv[3]) == {
        "files": ["/etc/bouwsteen/cluster.json", "/etc/patroni/config.yml"],  # sorted, de-duplicated
        "units": ["etcd.service", "patroni.service"],
        "packages": ["postgresql-15", "patroni", "pgbackrest"],
        "data_dir": "/var/lib/postgresql/15/main",
        "ports": [5432, 8008, 2379, 2380],
        "marker": MARKER_PATH,
        "tools": [],
    }
    assert MARKER_PATH == "/etc/bouwsteen/cluster.json"


def test_probe_command_renders_script_and_args_as_single_literals() -> None:
    c = probe_command(**PROBE_ARGS)
    tokens = shlex.split(c.render())
    assert tokens[:4] == ["timeout", "-k", "5", "30"]
    assert tokens[4:] == list(c.argv)
    compile(c.argv[2], "<probe>", "exec")  # the script is valid Python


@pytest.mark.parametrize("odd_path", ["/etc/with space.conf", "/etc/it's.conf", "/etc/$(id).conf"])
def test_probe_command_paths_with_shell_characters_survive(odd_path: str) -> None:
    c = probe_command(files=[odd_path], units=[], packages=[], data_dir="/d", ports=[])
    assert json.loads(shlex.split(c.render())[-1])["files"] == [odd_path]


# ------------------------------------------------------------------------------ parse_probe

RECORDED = {
    "hostname": "pg1",
    "os": {"id": "debian", "version_id": "12", "pretty": "Debian GNU/Linux 12 (bookworm)"},
    "packages": {"postgresql-15": "15.8-0+deb12u1", "patroni": "3.0.2-1", "pgbackrest": None},
    "files": {
        "/etc/bouwsteen/cluster.json": {
            "sha256": "ccca44244e244926d45d1d81c4eff590695ed3553d50dbc8f9198aaf850019b6",
            "owner": "root:root",
            "mode": 420,
        },
        "/etc/patroni/config.yml": None,
    },
    "marker": {"cluster": "lab"},
    "data_dir": {"exists": True, "entries": 23, "pg_version": "15"},
    "units": {
        "etcd.service": {"enabled": "enabled", "active": "active", "main_pid": 812, "loaded": "loaded"},
        "patroni.service": {"enabled": "", "active": "inactive", "main_pid": 0, "loaded": "not-found"},
    },
    "listeners": {"2379": "etcd", "2380": "etcd", "5432": "postgres"},
}


def test_parse_probe_recorded_sample() -> None:
    snap = parse_probe("pg1", CommandResult(stdout=json.dumps(RECORDED) + "\n"))
    assert snap == HostSnapshot(
        host="pg1",
        hostname="pg1",
        os_id="debian",
        os_version="12",
        os_pretty="Debian GNU/Linux 12 (bookworm)",
        packages={"postgresql-15": "15.8-0+deb12u1", "patroni": "3.0.2-1", "pgbackrest": None},
        files={
            "/etc/bouwsteen/cluster.json": FileState(
                sha256="ccca44244e244926d45d1d81c4eff590695ed3553d50dbc8f9198aaf850019b6", owner="root:root", mode=0o644
            ),
            "/etc/patroni/config.yml": None,
        },
        marker_cluster="lab",
        data_dir=DataDirState(exists=True, entries=23, pg_version="15"),
        units={
            "etcd.service": UnitState(enabled="enabled", active="active", main_pid=812, loaded="loaded"),
            "patroni.service": UnitState(enabled="", active="inactive", main_pid=0, loaded="not-found"),
        },
        listeners={2379: "etcd", 2380: "etcd", 5432: "postgres"},
    )
    assert snap.units["etcd.service"].is_running and snap.units["etcd.service"].is_enabled
    assert not snap.units["patroni.service"].is_running and not snap.units["patroni.service"].is_enabled
    assert not snap.data_dir.is_empty


@pytest.mark.parametrize(
    ("marker", "expected"),
    [(None, None), ({"cluster": "prod"}, "prod"), ({}, None), (["lab"], None), ("lab", None)],
    ids=["none", "other-cluster", "empty", "list", "string"],
)
def test_parse_probe_marker(marker, expected) -> None:
    sample = {**RECORDED, "marker": marker}
    assert parse_probe("pg1", CommandResult(stdout=json.dumps(sample))).marker_cluster == expected


@pytest.mark.parametrize(
    ("state", "is_empty"),
    [
        ({"exists": False, "entries": 0, "pg_version": None}, True),
        ({"exists": True, "entries": 0, "pg_version": None}, True),
        ({"exists": True, "entries": 1, "pg_version": None}, False),
    ],
)
def test_data_dir_is_empty(state: dict, is_empty: bool) -> None:
    sample = {**RECORDED, "data_dir": state}
    assert parse_probe("pg1", CommandResult(stdout=json.dumps(sample))).data_dir.is_empty is is_empty


@pytest.mark.parametrize(
    ("stdout", "stderr"),
    [
        ("", ""),
        ("not json at all", ""),
        ('{"hostname": "pg2", "os": ', ""),
        ("", "Traceback (most recent call last):\n  ...\nPermissionError: [Errno 13] Permission denied"),
        ("bash: python3: command not found", "bash: python3: command not found"),
    ],
    ids=["empty", "text", "truncated", "traceback", "no-python"],
)
def test_parse_probe_garbage_names_the_host(stdout: str, stderr: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_probe("pg2", CommandResult(stdout=stdout, stderr=stderr, exit_code=1))
    message = str(info.value)
    assert message.startswith("pg2: host probe printed no JSON (")
    assert message.endswith(stderr.strip()[-300:])


def test_parse_probe_garbage_keeps_only_stderr_tail() -> None:
    stderr = "x" * 1000 + "THE-END"
    with pytest.raises(ValueError) as info:
        parse_probe("pg3", CommandResult(stdout="", stderr=stderr))
    assert str(info.value).endswith("x" * 293 + "THE-END")
    assert "x" * 301 not in str(info.value)


# ------------------------------------------------------------------------------ the probe script, run here


def run_probe(args: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    c = probe_command(**args)
    assert c.argv[:2] == ("python3", "-c")
    script, args_json = c.argv[2], c.argv[3]
    return subprocess.run([sys.executable, "-c", script, args_json], capture_output=True, text=True, timeout=30,
                          env=env)


def owner_of(path: Path) -> str:
    st = path.stat()
    return f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"


def test_probe_script_runs_locally(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "PG_VERSION").write_text("15\n")
    (data_dir / "base").mkdir()
    managed = tmp_path / "managed.conf"
    content = b"listen = 10.0.0.11\npassword = 'x'\n" * 5000  # > one 64 KiB read chunk
    managed.write_bytes(content)
    managed.chmod(0o640)
    missing = tmp_path / "missing.conf"

    result = run_probe(dict(files=[str(managed), str(missing)], units=[], packages=[], data_dir=str(data_dir),
                            ports=[]))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["files"][str(managed)] == {
        "sha256": hashlib.sha256(content).hexdigest(),
        "owner": owner_of(managed),
        "mode": 0o640,
    }
    assert out["files"][str(missing)] is None
    assert out["data_dir"] == {"exists": True, "entries": 2, "pg_version": "15"}
    assert out["packages"] == {} and out["units"] == {} and out["listeners"] == {}
    assert out["hostname"] == os.uname().nodename

    snap = parse_probe("local", CommandResult(stdout=result.stdout))
    assert snap.files[str(managed)] == FileState(hashlib.sha256(content).hexdigest(), owner_of(managed), 0o640)
    assert snap.files[str(missing)] is None
    assert snap.data_dir == DataDirState(exists=True, entries=2, pg_version="15")
    assert snap.hostname == os.uname().nodename


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: None, {"exists": False, "entries": 0, "pg_version": None}),
        (lambda p: p.mkdir(), {"exists": True, "entries": 0, "pg_version": None}),
        (lambda p: (p.mkdir(), (p / "lost+found").mkdir()), {"exists": True, "entries": 1, "pg_version": None}),
    ],
    ids=["absent", "empty", "foreign-content"],
)
def test_probe_script_data_dir_states(tmp_path: Path, make, expected: dict) -> None:
    data_dir = tmp_path / "pgdata"
    make(data_dir)
    result = run_probe(dict(files=[], units=[], packages=[], data_dir=str(data_dir), ports=[]))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data_dir"] == expected


FAKE_SS = r"""#!/bin/sh
cat <<'EOF'
LISTEN 0      244      172.29.66.11:5432      0.0.0.0:*    users:(("postgres",pid=1234,fd=6))
LISTEN 0      244         127.0.0.1:5432      0.0.0.0:*    users:(("postgres",pid=1234,fd=7))
LISTEN 0      4096             [::]:2379         [::]:*    users:(("etcd",pid=99,fd=7))
LISTEN 0      5        172.29.66.11:8008      0.0.0.0:*    users:(("python3",pid=4242,fd=5))
LISTEN 0      128           0.0.0.0:22        0.0.0.0:*    users:(("sshd",pid=1,fd=3))
LISTEN 0      128           0.0.0.0:2380      0.0.0.0:*
EOF
"""

FAKE_DPKG_QUERY = r"""#!/bin/sh
printf 'postgresql-15\t15.8-0+deb12u1\tii \n'
printf 'patroni\t3.0.2-1\trc \n'
echo "dpkg-query: no packages found matching pgbackrest" >&2
exit 1
"""

FAKE_SYSTEMCTL = r"""#!/bin/sh
case "$4" in
  patroni.service) printf 'MainPID=4242\nLoadState=loaded\nActiveState=active\nUnitFileState=enabled\n' ;;
  *) printf 'MainPID=0\nLoadState=not-found\nActiveState=inactive\nUnitFileState=\n' ;;
esac
"""


def test_probe_script_parses_tools_output(tmp_path: Path) -> None:
    """Fake `ss`, `dpkg-query` and `systemctl` with recorded Debian 12 output shapes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ss", FAKE_SS), ("dpkg-query", FAKE_DPKG_QUERY), ("systemctl", FAKE_SYSTEMCTL)):
        tool = bin_dir / name
        tool.write_text(text)
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    result = run_probe(
        dict(files=[], units=["patroni.service", "etcd.service"], packages=["postgresql-15", "patroni", "pgbackrest"],
             data_dir=str(tmp_path / "none"), ports=[5432, 8008, 2379, 2380]),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    snap = parse_probe("pg1", CommandResult(stdout=result.stdout))
    assert snap.packages == {"postgresql-15": "15.8-0+deb12u1", "patroni": None, "pgbackrest": None}
    assert snap.units == {
        "patroni.service": UnitState(enabled="enabled", active="active", main_pid=4242, loaded="loaded"),
        "etcd.service": UnitState(enabled="", active="inactive", main_pid=0, loaded="not-found"),
    }
    # sshd's port 22 is not asked for; 2380 has no process column (not root): ""
    assert snap.listeners == {5432: "postgres", 2379: "etcd", 8008: "python3", 2380: ""}


def test_probe_script_reports_tool_releases(tmp_path: Path) -> None:
    """`<tool> --version` first line for tools with a release floor; None when missing or failing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "patroni").write_text("#!/bin/sh\necho 'patroni 4.0.7'\necho second line\n")
    (bin_dir / "broken").write_text("#!/bin/sh\necho oops >&2\nexit 3\n")
    for tool in ("patroni", "broken"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = run_probe(dict(files=[], units=[], packages=[], data_dir=str(tmp_path / "none"), ports=[],
                            tools=["patroni", "broken", "no-such-tool-here"]), env=env)
    assert result.returncode == 0, result.stderr
    snap = parse_probe("pg1", result)
    assert snap.tools == {"patroni": "patroni 4.0.7", "broken": None, "no-such-tool-here": None}
