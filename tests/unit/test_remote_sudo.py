"""A plain SSH login user with passwordless sudo (tasks/adapters/remote.py), without a host.

The connection is a recording fake: what matters is which lines go out (through `sudo -n` or
not), where the SFTP upload lands, and which error type a refusal becomes. The staging and
install scripts themselves are run here, locally, in a temporary home.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shlex
import stat
import subprocess
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from prefect.states import Failed

from tasks.adapters.commands import ManagedFile, cmd, script
from tasks.adapters.remote import (
    STAGING_DIR,
    RemoteHost,
    RemoteUnreachable,
    SshAuth,
    SshTarget,
    SudoRefused,
    UploadFailed,
    install_command,
    staging_command,
    sudo_refusal,
)
from tasks.runtime import _retry_on_transient

KEY = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()).decode()
STAGING_MARK = 'd="$HOME/$1"'  # the staging script's first words, as they appear in the sent line
SECRET = "s3cr3t-value-never-on-argv"
SPEC = ManagedFile("/etc/pgbackrest/pgbackrest.conf", f"repo1-s3-key-secret={SECRET}\n", owner="postgres",
                   mode=0o600, secret=True)


# ----------------------------------------------------------------------------- a recording connection


@dataclass
class Answer:
    stdout: str = ""
    stderr: str = ""
    exited: int = 0


@dataclass
class FakeFile:
    sftp: "FakeSftp"
    path: str

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def chmod(self, mode: int) -> None:
        self.sftp.events.append(("chmod", self.path, mode))

    def write(self, data: bytes) -> None:
        self.sftp.events.append(("write", self.path, data))


@dataclass
class FakeSftp:
    fail: BaseException | None = None
    events: list = field(default_factory=list)

    def open(self, path: str, mode: str) -> FakeFile:
        if self.fail is not None:
            raise self.fail
        self.events.append(("open", path, mode))
        return FakeFile(self, path)


class FakeTransport:
    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


class FakeConnection:
    """What RemoteHost uses of fabric.Connection; `answers` maps a text in the sent line to its answer."""

    def __init__(self, home: str, answers: dict[str, Answer] | None = None) -> None:
        self.home = home
        self.answers = answers or {}
        self.lines: list[str] = []
        self.transport = FakeTransport()
        self.sftp_client = FakeSftp()
        self.is_connected = True

    def run(self, line: str, timeout: float):
        self.lines.append(line)
        for description, answer in self.answers.items():
            if description in line:
                return answer
        if STAGING_MARK in line:
            return Answer(stdout=f"{self.home}/{STAGING_DIR}\n")
        if "sha256sum" in line:
            return Answer(exited=3)  # the file does not exist yet
        return Answer()

    def sftp(self) -> FakeSftp:
        return self.sftp_client

    def close(self) -> None:
        pass


def remote(user: str, **answers: Answer) -> tuple[RemoteHost, FakeConnection]:
    host = RemoteHost(SshTarget("pg3", "172.29.66.13", user=user), SshAuth(private_key=KEY, known_hosts=""))
    home = "/root" if user == "root" else f"/home/{user}"
    fake = FakeConnection(home, dict(answers))
    host._conn = fake  # noqa: SLF001 - the seam this test needs
    return host, fake


def argv(line: str) -> list[str]:
    return shlex.split(line)


# ----------------------------------------------------------------------------- commands through sudo


def test_a_plain_user_runs_every_command_through_sudo_and_switches_users_with_runuser() -> None:
    host, fake = remote("bouwsteen")
    host.run(cmd("pgbackrest", "info", user="postgres", timeout=30))
    assert argv(fake.lines[0])[:10] == ["sudo", "-n", "--", "timeout", "-k", "5", "30", "runuser", "-u", "postgres"]


def test_root_runs_without_sudo() -> None:
    host, fake = remote("root")
    host.run(cmd("pgbackrest", "info", user="postgres", timeout=30))
    assert argv(fake.lines[0])[:7] == ["timeout", "-k", "5", "30", "runuser", "-u", "postgres"]


def test_as_login_user_skips_sudo_and_cannot_switch_users() -> None:
    host, fake = remote("bouwsteen")
    host.run(cmd("id", "-un"), as_login_user=True)
    assert argv(fake.lines[0])[0] == "timeout"
    with pytest.raises(ValueError, match="needs root"):
        host.run(cmd("id", user="postgres"), as_login_user=True)


@pytest.mark.parametrize(("exit_code", "stderr", "refused"), [
    (1, "sudo: a password is required\n", "sudo: a password is required"),
    (1, "sudo: a terminal is required to read the password; either use the -S option to read from standard input"
        " or configure an askpass helper\n", "sudo: a terminal is required"),
    (1, "bouwsteen is not in the sudoers file.  This incident will be reported.\n", "bouwsteen is not in the sudoers"),
    (1, "Sorry, user bouwsteen is not allowed to execute '/usr/bin/timeout -k 5 60 id' as root on pg3.\n",
     "Sorry, user bouwsteen is not allowed"),
    (127, "bash: line 1: sudo: command not found\n", "sudo is not installed"),
    # the command's own failures are not sudo's
    (1, "ERROR: [056]: unable to find primary cluster\n", None),
    (1, "", None),
    (0, "sudo: unable to resolve host pg3: Name or service not known\n", None),  # a warning; it ran
    # ... and the command's own "no" (systemctl is-active, grep -q) after that warning
    (1, "sudo: unable to resolve host pg3: Name or service not known\n", None),
    (1, "sudo: unable to resolve host pg3: Name or service not known\nsudo: a password is required\n",
     "sudo: a password is required"),
    (127, "bash: line 1: pgbackrest: command not found\n", None),
    (2, "sudo: a password is required\n", None),
])
def test_sudo_refusal(exit_code: int, stderr: str, refused: str | None) -> None:
    found = sudo_refusal(exit_code, stderr)
    assert (found is None) if refused is None else found.startswith(refused)


def test_a_sudo_refusal_is_typed_even_where_exit_1_is_an_answer() -> None:
    host, _ = remote("bouwsteen", **{"systemctl": Answer(stderr="sudo: a password is required\n", exited=1)})
    with pytest.raises(SudoRefused, match="passwordless sudo") as info:
        host.run(cmd("systemctl", "is-active", "patroni", ok_codes=range(0, 256)))
    assert _retry_on_transient(None, None, Failed(data=info.value)) is False


def test_root_is_never_judged_by_sudo_wording() -> None:
    host, _ = remote("root", **{"echo": Answer(stderr="sudo: a password is required\n", exited=1)})
    assert host.run(cmd("echo", ok_codes=(0, 1))).exit_code == 1


# ----------------------------------------------------------------------------- the upload sequence


def test_a_plain_user_stages_in_its_own_folder_then_sudo_installs() -> None:
    host, fake = remote("bouwsteen")
    assert host.ensure_file(SPEC) is True
    stat_line, staging_line, install_line = fake.lines
    assert argv(stat_line)[:3] == ["sudo", "-n", "--"]
    assert argv(staging_line)[0] == "timeout", "the staging folder must be the login user's, not root's"
    assert argv(install_line)[:3] == ["sudo", "-n", "--"]
    opened, chmod, write = fake.sftp_client.events
    staged = opened[1]
    assert staged.startswith(f"/home/bouwsteen/{STAGING_DIR}/")
    assert chmod == ("chmod", staged, 0o600), "restricted before a byte is written"
    assert write == ("write", staged, SPEC.content.encode())
    # install's arguments: the staged copy, owner:group, mode, target
    assert argv(install_line)[-4:] == [staged, "postgres:postgres", "600", SPEC.path]
    assert all(SECRET not in line for line in fake.lines), "file content went onto a command line"


def test_the_staging_folder_is_prepared_once_per_connection() -> None:
    host, fake = remote("bouwsteen")
    host.ensure_file(SPEC)
    host.ensure_file(ManagedFile("/etc/x.conf", "x\n"))
    assert sum(STAGING_MARK in line for line in fake.lines) == 1


def test_root_stages_in_roots_home_without_sudo() -> None:
    host, fake = remote("root")
    host.ensure_file(SPEC)
    assert not any("sudo" in argv(line)[:1] for line in fake.lines)
    assert fake.sftp_client.events[0][1].startswith(f"/root/{STAGING_DIR}/")


@pytest.mark.parametrize("failure", [
    PermissionError(errno.EACCES, "Permission denied"),
    OSError(errno.ENOSPC, "No space left on device"),
    __import__("paramiko").SSHException("Channel closed."),  # no SFTP subsystem
], ids=["permission", "disk-full", "no-sftp"])
def test_a_refused_upload_is_typed_and_never_retried(failure: BaseException) -> None:
    host, fake = remote("bouwsteen")
    fake.sftp_client.fail = failure
    with pytest.raises(UploadFailed, match="SFTP as bouwsteen") as info:
        host.ensure_file(SPEC)
    assert not isinstance(info.value, RemoteUnreachable)
    assert _retry_on_transient(None, None, Failed(data=info.value)) is False


def test_an_upload_cut_off_by_a_dead_connection_is_transient() -> None:
    host, fake = remote("bouwsteen")
    fake.sftp_client.fail = EOFError()
    fake.transport.active = False
    with pytest.raises(RemoteUnreachable) as info:
        host.ensure_file(SPEC)
    assert _retry_on_transient(None, None, Failed(data=info.value)) is True


def test_a_staging_folder_that_is_not_the_users_own_is_refused() -> None:
    host, fake = remote("bouwsteen", **{STAGING_MARK: Answer(
        stderr=f"/home/bouwsteen/{STAGING_DIR} is not a folder owned by bouwsteen; remove it\n", exited=3)})
    with pytest.raises(UploadFailed, match="not a folder owned by bouwsteen"):
        host.ensure_file(SPEC)
    assert fake.sftp_client.events == []


# ----------------------------------------------------------------------------- the scripts, run locally


def run_local(command, home) -> subprocess.CompletedProcess:
    return subprocess.run(argv(command.render()), capture_output=True, text=True,
                          env={"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")})


def test_staging_script_makes_a_0700_folder_of_the_users_own(tmp_path) -> None:
    for _ in range(2):  # a second run finds it and changes nothing
        result = run_local(staging_command(), tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{tmp_path}/{STAGING_DIR}"
    folder = tmp_path / STAGING_DIR
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()


def test_staging_script_tightens_a_loose_folder(tmp_path) -> None:
    (tmp_path / STAGING_DIR).mkdir(mode=0o755)
    (tmp_path / STAGING_DIR).chmod(0o755)
    assert run_local(staging_command(), tmp_path).returncode == 0
    assert stat.S_IMODE((tmp_path / STAGING_DIR).stat().st_mode) == 0o700


@pytest.mark.parametrize("make", ["symlink", "file"])
def test_staging_script_refuses_what_is_not_a_plain_folder(tmp_path, make: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if make == "symlink":
        (tmp_path / STAGING_DIR).symlink_to(elsewhere)
    else:
        (tmp_path / STAGING_DIR).write_text("")
    result = run_local(staging_command(), tmp_path)
    assert result.returncode == 3 and "is not a folder owned by" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a folder to another user needs root")
def test_staging_script_refuses_a_folder_root_left_behind(tmp_path) -> None:
    # The old bug: root made the plain user's staging folder, so SFTP as that user could not write.
    nobody = pwd.getpwnam("nobody")
    (tmp_path / STAGING_DIR).mkdir(mode=0o700)
    os.chown(tmp_path / STAGING_DIR, nobody.pw_uid, nobody.pw_gid)
    result = run_local(staging_command(), tmp_path)
    assert result.returncode == 3


def test_install_script_puts_the_file_in_place_and_removes_the_staged_copy(tmp_path) -> None:
    me, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    staged = tmp_path / "staged"
    staged.write_text("new\n")
    target = tmp_path / "etc" / "app" / "app.conf"
    spec = ManagedFile(str(target), "new\n", owner=me, group=group, mode=0o640)
    result = run_local(install_command(str(staged), spec), tmp_path)
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "new\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert not staged.exists() and not (tmp_path / "etc/app/app.conf.bouwsteen-new").exists()


def test_install_script_fails_loudly_and_still_removes_the_staged_copy(tmp_path) -> None:
    staged = tmp_path / "staged"
    staged.write_text("new\n")
    target = tmp_path / "app.conf"
    target.write_text("old\n")
    spec = ManagedFile(str(target), "new\n", owner="no-such-user-bouwsteen", mode=0o600)
    result = run_local(install_command(str(staged), spec), tmp_path)
    assert result.returncode != 0, "a failed install must not report success"
    assert target.read_text() == "old\n" and not staged.exists()


def test_the_install_script_holds_no_content() -> None:
    assert SECRET not in install_command("/home/bouwsteen/.bouwsteen-staging/x", SPEC).render(sudo=True)
    assert script("true").render(sudo=True).startswith("sudo -n -- timeout ")


# ----------------------------------------------------------------------------- a refused login


def test_a_refused_key_is_a_refused_login_not_an_unreachable_host() -> None:
    import paramiko

    from tasks.adapters.remote import LoginRefused

    host, fake = remote("root")
    fake.is_connected = False

    def refuse() -> None:
        raise paramiko.AuthenticationException("Authentication failed.")

    fake.open = refuse
    with pytest.raises(LoginRefused, match="refused the SSH key for user root") as info:
        host.run(cmd("true"))
    assert not isinstance(info.value, RemoteUnreachable)
    assert _retry_on_transient(None, None, Failed(data=info.value)) is False


def test_an_authentication_timeout_is_an_unreachable_host() -> None:
    import paramiko

    host, fake = remote("bouwsteen")
    fake.is_connected = False

    def slow() -> None:
        raise paramiko.AuthenticationException("Authentication timeout.")

    fake.open = slow
    with pytest.raises(RemoteUnreachable) as info:
        host.run(cmd("true"))
    assert _retry_on_transient(None, None, Failed(data=info.value)) is True
