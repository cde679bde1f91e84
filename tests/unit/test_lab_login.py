"""The lab's non-root login (lab/image.py, lab/machine.py, lab/manager.py), without booting a host.

pg3 takes the flows' key only as `bouwsteen` (passwordless sudo); root takes the lab's own
tooling key everywhere and the flows' key everywhere else. The host's disk layer is written into
a temporary directory here, against a stand-in image's /etc/passwd.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from blocks.inventory import parse_inventory
from lab.image import LOGIN_USER, sudoers_rule
from lab.machine import LabError, Machine, image_account
from lab.manager import Lab
from lab.paths import LabPaths
from lab.topology import DEFAULT_HOSTS, host_by_name

FLOWS_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFLOWSFLOWSFLOWSFLOWSFLOWSFLOWSFLOWSFLOWS bouwsteen-lab"
TOOL_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITOOLSTOOLSTOOLSTOOLSTOOLSTOOLSTOOLSTOOL bouwsteen-lab-tools"


def fake_image(tmp_path: Path) -> Path:
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    (image / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\n"
        "postgres:x:105:111:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n"
        f"{LOGIN_USER}:x:1000:1000:bouwsteen flows, passwordless sudo:/home/{LOGIN_USER}:/bin/bash\n"
    )
    return image


def test_one_database_host_is_reached_through_the_non_root_user() -> None:
    with_user = [h.name for h in DEFAULT_HOSTS if h.ssh_user]
    assert with_user == ["pg3"] and host_by_name("pg3").ssh_user == LOGIN_USER
    assert "db" in host_by_name("pg3").roles  # in every cluster runbook


def test_the_lab_inventory_names_the_login_user_of_pg3(tmp_path: Path) -> None:
    document = Lab(paths=LabPaths(tmp_path)).inventory_document()
    inv = parse_inventory(document)
    assert inv.ssh.user == "root"
    assert {h.name: h.ssh_user for h in inv.hosts}["pg3"] == LOGIN_USER
    assert [h.name for h in inv.hosts if h.ssh_user] == ["pg3"]


def test_the_lab_tooling_logs_in_as_root_with_its_own_key(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path)
    argv = Lab(paths=paths).ssh_argv(host_by_name("pg3"))
    assert argv[argv.index("-i") + 1] == str(paths.tool_key) != str(paths.ssh_key)
    assert "IdentitiesOnly=yes" in argv and argv[-1] == "root@172.29.66.13"


def test_image_account_reads_the_images_passwd(tmp_path: Path) -> None:
    image = fake_image(tmp_path)
    assert image_account(image, LOGIN_USER) == (1000, 1000, f"/home/{LOGIN_USER}")
    with pytest.raises(LabError, match="no user 'nobody-here'"):
        image_account(image, "nobody-here")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ssh-keygen") is None,
                    reason="needs root (ownership in the disk layer) and ssh-keygen (the host key)")
@pytest.mark.parametrize("name", ["pg1", "pg3"])
def test_the_disk_layer_authorizes_the_keys(tmp_path: Path, name: str) -> None:
    machine = Machine(host_by_name(name), LabPaths(tmp_path), fake_image(tmp_path))
    machine.ensure_disk(FLOWS_KEY, TOOL_KEY)
    root_keys = (machine.upper / "root/.ssh/authorized_keys").read_text().splitlines()
    user_keys = machine.upper / f"home/{LOGIN_USER}/.ssh/authorized_keys"
    if name == "pg3":
        assert root_keys == [TOOL_KEY], "the flows' key must not be a root key on pg3"
        assert user_keys.read_text() == FLOWS_KEY + "\n"
        for path, mode in ((user_keys.parent.parent, 0o700), (user_keys.parent, 0o700), (user_keys, 0o600)):
            info = path.stat()
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1000, 1000, mode), path
        home = machine.upper / "home"
        assert (home.stat().st_uid, stat.S_IMODE(home.stat().st_mode)) == (0, 0o755)
    else:
        assert root_keys == [TOOL_KEY, FLOWS_KEY]
        assert not user_keys.exists()


def test_the_sudoers_rule_is_passwordless_for_the_login_user_only() -> None:
    rule = sudoers_rule(LOGIN_USER)
    lines = [line for line in rule.splitlines() if not line.startswith("#")]
    assert lines == [f"{LOGIN_USER} ALL=(ALL:ALL) NOPASSWD: ALL"]


@pytest.mark.skipif(shutil.which("visudo") is None, reason="needs sudo's visudo (the image build runs it too)")
def test_visudo_accepts_the_sudoers_rule(tmp_path: Path) -> None:
    path = tmp_path / "bouwsteen"
    path.write_text(sudoers_rule(LOGIN_USER))
    path.chmod(0o440)
    result = subprocess.run(["visudo", "-cf", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
