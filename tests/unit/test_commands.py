"""tasks/adapters/commands.py: argv quoting, the timeout/runuser/sudo/env prefix, validation, ManagedFile."""

from __future__ import annotations

import hashlib
import math
import shlex
import subprocess

import pytest

from tasks.adapters.commands import (
    DEFAULT_TIMEOUT,
    Command,
    CommandError,
    ManagedFile,
    chain,
    cmd,
    script,
)

# Arguments a shell would interpret if they were not quoted: each must arrive as one literal argument.
NASTY = [
    "with space",
    "it's",
    'say "hi"',
    "$(rm -rf /)",
    "`id`",
    "${HOME}",
    "$HOME",
    "a; reboot",
    "a && b || c",
    "a | b",
    "> /etc/passwd",
    "line1\nline2",
    "tab\there",
    "*",
    "~root",
    "",
    "--",
    "-rf",
    "back\\slash",
    "#comment",
    "ünïcødé €",
    "'\"'\"'",
    "!history",
]


@pytest.mark.parametrize("arg", NASTY, ids=[repr(a) for a in NASTY])
def test_cmd_argument_round_trips_as_one_literal(arg: str) -> None:
    rendered = cmd("echo", arg).render()
    assert shlex.split(rendered) == ["timeout", "-k", "5", "60", "echo", arg]


def test_cmd_all_nasty_arguments_together_round_trip() -> None:
    c = cmd("printf", "%s\\0", *NASTY, user="postgres", env={"X": "$(id)"})
    assert shlex.split(c.render(sudo=True)) == [
        "sudo", "-n", "--", "timeout", "-k", "5", "60", "runuser", "-u", "postgres", "--", "env", "X=$(id)",
        "printf", "%s\\0", *NASTY,
    ]


def test_rendered_line_runs_in_a_real_shell_with_literal_arguments() -> None:
    # The SSH side runs the line through a shell: run it through bash here (no timeout prefix issues:
    # coreutils `timeout` is on every Debian host and this machine).
    line = cmd("printf", "%s\\0", *NASTY, timeout=10, env={"BOUWSTEEN_T": "a b"}).render()
    out = subprocess.run(["bash", "-c", line], capture_output=True, check=True).stdout
    assert out.decode().split("\0")[:-1] == NASTY


@pytest.mark.parametrize(
    ("kwargs", "sudo", "prefix"),
    [
        ({}, False, ["timeout", "-k", "5", "60"]),
        ({"timeout": 90}, False, ["timeout", "-k", "5", "90"]),
        ({"timeout": 2.5}, False, ["timeout", "-k", "5", "2.5"]),
        ({"timeout": 24 * 3600}, False, ["timeout", "-k", "5", "86400"]),
        ({}, True, ["sudo", "-n", "--", "timeout", "-k", "5", "60"]),
        ({"user": "postgres"}, False, ["timeout", "-k", "5", "60", "runuser", "-u", "postgres", "--"]),
        ({"user": "postgres"}, True,
         ["sudo", "-n", "--", "timeout", "-k", "5", "60", "runuser", "-u", "postgres", "--"]),
        ({"env": {"PGDATA": "/var/lib/pg"}}, False, ["timeout", "-k", "5", "60", "env", "PGDATA=/var/lib/pg"]),
        # env is sorted by name so the same mapping always renders the same line
        ({"env": {"B": "2", "A": "x y", "_C": ""}}, False, ["timeout", "-k", "5", "60", "env", "A=x y", "B=2", "_C="]),
        ({"user": "etcd", "env": {"ETCDCTL_API": "3"}, "timeout": 5}, True,
         ["sudo", "-n", "--", "timeout", "-k", "5", "5", "runuser", "-u", "etcd", "--", "env", "ETCDCTL_API=3"]),
    ],
    ids=["default", "int-timeout", "float-timeout", "max-timeout", "sudo", "user", "user-sudo", "env", "env-sorted",
         "everything"],
)
def test_render_prefix(kwargs: dict, sudo: bool, prefix: list[str]) -> None:
    c = cmd("pg_isready", "-q", **kwargs)
    assert shlex.split(c.render(sudo=sudo)) == [*prefix, "pg_isready", "-q"]


def test_render_exact_line() -> None:
    c = cmd("echo", "a b", timeout=0.5, user="postgres", env={"A": "1 2", "B": "x"})
    assert c.render(sudo=True) == "sudo -n -- timeout -k 5 0.5 runuser -u postgres -- env 'A=1 2' B=x echo 'a b'"
    assert c.render() == "timeout -k 5 0.5 runuser -u postgres -- env 'A=1 2' B=x echo 'a b'"


@pytest.mark.parametrize("sudo", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"user": "postgres"}, {"env": {"A": "1"}}, {"timeout": 1}])
def test_render_always_has_timeout_kill_5(kwargs: dict, sudo: bool) -> None:
    tokens = shlex.split(cmd("true", **kwargs).render(sudo=sudo))
    start = 3 if sudo else 0
    assert tokens[start:start + 3] == ["timeout", "-k", "5"]
    assert float(tokens[start + 3]) == kwargs.get("timeout", DEFAULT_TIMEOUT)


def test_cmd_converts_numbers_to_strings() -> None:
    c = cmd("sleep", 5, 1.5)
    assert c.argv == ("sleep", "5", "1.5")


def test_cmd_fields() -> None:
    c = cmd("pg_isready", env={"Z": "1", "A": "2"}, ok_codes=[0, 2], description="is it up")
    assert c.env == (("A", "2"), ("Z", "1"))
    assert c.ok_codes == (0, 2)
    assert str(c) == "is it up"
    assert str(cmd("echo", "a b")) == "echo 'a b'"


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "name",
    ["1ABC", "A-B", "A B", "", "A=B", "$A", "A;B", "Ä"],
    ids=["leading-digit", "dash", "space", "empty", "equals", "dollar", "semicolon", "non-ascii"],
)
def test_invalid_env_name_raises(name: str) -> None:
    with pytest.raises(CommandError, match="invalid environment variable name"):
        cmd("true", env={name: "x"})


def test_env_name_with_trailing_newline_raises() -> None:
    with pytest.raises(CommandError):
        cmd("true", env={"FOO\n": "x"})


@pytest.mark.parametrize("name", ["A", "_", "PGDATA", "pg_data_2", "_X1"])
def test_valid_env_names(name: str) -> None:
    assert cmd("true", env={name: "v"}).env == ((name, "v"),)


@pytest.mark.parametrize(
    "user",
    ["Postgres", "post gres", "", "root;id", "-u", "1user", "pg$x", "$(id)", "user/x"],
    ids=["uppercase", "space", "empty", "semicolon", "option", "leading-digit", "inner-dollar", "subst", "slash"],
)
def test_invalid_user_raises(user: str) -> None:
    with pytest.raises(CommandError, match="invalid user name"):
        cmd("true", user=user)


def test_user_with_trailing_newline_raises() -> None:
    with pytest.raises(CommandError):
        cmd("true", user="postgres\n")


@pytest.mark.parametrize("user", ["postgres", "_apt", "etcd", "pg-backup", "machine$", "a"])
def test_valid_users(user: str) -> None:
    assert cmd("true", user=user).user == user


@pytest.mark.parametrize("timeout", [0, -1, -0.5, 24 * 3600 + 1, math.inf, math.nan])
def test_invalid_timeout_raises(timeout: float) -> None:
    with pytest.raises(CommandError, match="timeout must be between 0 and 24 h"):
        cmd("true", timeout=timeout)


def test_empty_command_raises() -> None:
    with pytest.raises(CommandError, match="empty command"):
        cmd()
    with pytest.raises(CommandError, match="empty command"):
        Command(argv=())


def test_command_is_frozen() -> None:
    c = cmd("true")
    with pytest.raises(AttributeError):
        c.argv = ("false",)  # type: ignore[misc]


# ------------------------------------------------------------------------------ script


def test_script_argv_shape() -> None:
    text = "set -x\npg_ctl status -D \"$1\" | grep -q running\n"
    s = script(text, args=["/var/lib/postgresql/15/main", "x y"], user="postgres", timeout=12)
    assert s.argv == ("bash", "--norc", "-euo", "pipefail", "-c", text, "bouwsteen", "/var/lib/postgresql/15/main", "x y")
    assert s.user == "postgres" and s.timeout == 12
    assert shlex.split(s.render()) == [
        "timeout", "-k", "5", "12", "runuser", "-u", "postgres", "--",
        "bash", "--norc", "-euo", "pipefail", "-c", text, "bouwsteen", "/var/lib/postgresql/15/main", "x y",
    ]


@pytest.mark.parametrize(
    ("text", "description", "expected"),
    [
        ("\n  echo one\necho two\n", "", "echo one"),
        ("echo one", "", "echo one"),
        ("echo one", "say one", "say one"),
    ],
)
def test_script_description(text: str, description: str, expected: str) -> None:
    assert script(text, description=description).description == expected


def test_script_runs_with_args_literal() -> None:
    s = script('printf "%s\\0" "$@"', args=NASTY, timeout=10)
    out = subprocess.run(["bash", "-c", s.render()], capture_output=True, check=True).stdout
    assert out.decode().split("\0")[:-1] == NASTY


def test_script_pipefail_is_on() -> None:
    s = script("false | true", timeout=10)
    assert subprocess.run(["bash", "-c", s.render()], capture_output=True).returncode == 1


@pytest.mark.parametrize("text", ["", "   \n"])
def test_script_empty_text_raises_command_error(text: str) -> None:
    with pytest.raises(CommandError):
        script(text)


# ------------------------------------------------------------------------------ ManagedFile


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o610, 0o601, 0o777])
def test_secret_file_readable_by_others_raises(mode: int) -> None:
    with pytest.raises(CommandError, match="a secret file must not be readable by group or others"):
        ManagedFile("/etc/patroni/config.yml", "password: x", mode=mode, secret=True)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o200])
def test_secret_file_private_modes_ok(mode: int) -> None:
    assert ManagedFile("/etc/x", "s", mode=mode, secret=True).mode == mode


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o755])
def test_non_secret_file_any_mode(mode: int) -> None:
    assert ManagedFile("/etc/x", "s", mode=mode).mode == mode


@pytest.mark.parametrize("path", ["etc/patroni/config.yml", "./config.yml", "", "~/x", "../x"])
def test_relative_path_raises(path: str) -> None:
    with pytest.raises(CommandError, match="managed file path must be absolute"):
        ManagedFile(path, "x")


@pytest.mark.parametrize(
    ("content", "digest"),
    [
        ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        ("hello\n", "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),
        ("€", hashlib.sha256("€".encode("utf-8")).hexdigest()),
    ],
    ids=["empty", "hello", "utf8"],
)
def test_sha256_known_values(content: str, digest: str) -> None:
    assert ManagedFile("/etc/x", content).sha256 == digest


def test_sha256_stable_and_content_only() -> None:
    a = ManagedFile("/etc/a", "data\n", owner="root", mode=0o644)
    b = ManagedFile("/etc/b", "data\n", owner="postgres", group="postgres", mode=0o600, secret=True)
    assert a.sha256 == a.sha256 == b.sha256
    assert ManagedFile("/etc/a", "data").sha256 != a.sha256


@pytest.mark.parametrize(("owner", "group", "expected"), [("root", None, "root"), ("postgres", "ssl-cert", "ssl-cert")])
def test_owner_group(owner: str, group: str | None, expected: str) -> None:
    assert ManagedFile("/etc/x", "", owner=owner, group=group).owner_group == expected


def test_chain_runs_each_command_in_order_with_literal_arguments(tmp_path) -> None:
    log = tmp_path / "log"
    line = chain(cmd("sh", "-c", 'printf "%s\\n" "$1" >> "$2"', "sh", "first; $(id)", str(log), timeout=10),
                 script('printf "%s\\n" "$1" >> "$2"', args=["second 'x'", str(log)], timeout=10),
                 description="two steps").render()
    subprocess.run(["bash", "-c", line], check=True)
    assert log.read_text().splitlines() == ["first; $(id)", "second 'x'"]


def test_chain_stops_at_the_first_failure(tmp_path) -> None:
    after = tmp_path / "after"
    line = chain(cmd("true", timeout=10), cmd("false", timeout=10), cmd("touch", str(after), timeout=10),
                 description="fails in the middle").render()
    assert subprocess.run(["bash", "-c", line]).returncode == 1
    assert not after.exists()


def test_chain_keeps_each_commands_user_and_timeout_and_sums_the_timeouts() -> None:
    first, second = cmd("pgbackrest", "restore", user="postgres", timeout=600), cmd("du", "-sb", "/x", timeout=30)
    chained = chain(first, second, description="restore, then measure")
    assert chained.argv[-1] == first.render() + "\n" + second.render()
    assert chained.timeout == 600 + 5 + 30 + 5
    assert chained.user is None and str(chained) == "restore, then measure"


@pytest.mark.parametrize("commands", [(), (cmd("pg_isready", ok_codes=(0, 2)),)])
def test_chain_refuses_nothing_and_commands_whose_failures_are_answers(commands) -> None:
    with pytest.raises(CommandError):
        chain(*commands, description="x")
